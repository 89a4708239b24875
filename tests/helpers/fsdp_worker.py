"""One rank of the FSDP2 checks of ``tests/test_fsdp.py``, started by ``torchrun`` (gloo, CPU) with tests/ on
PYTHONPATH.

Every rank compares what FSDP2 (``revcol.distributed.shard``) computes with a single-process run of plain
autograd on an unsharded copy of the model:

* ``drop_path = 0``: FSDP averages the ranks' gradients of their shard-of-batch mean losses, which is the
  gradient of the global-batch mean loss; the reference runs on the whole global batch.
* ``drop_path > 0``: drop-path draws its masks from the generator of the process that runs it, so each rank
  seeds both its FSDP step and its reference step alike (the same masks, replayed by the reversible backward)
  on its own shard of the batch; the reference is the mean of those gradients over the ranks.

Two iterations with an SGD step between: the gradients of both, and the parameters after each step, must equal
the reference's. Then a mixed-precision (bfloat16 parameters, float32 reduction) step is compared loosely, and a
sharded checkpoint plus the full state dict are written to ``--out`` for the test process to compare; the ranks
also load the checkpoint back into another sharded model.
Prints ``RANK <r> OK`` at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import Shard

from helpers.models import make_input, make_net
from revcol.diagnostics import output_weights, relative_error
from revcol.distributed.checkpoints import load_checkpoint, save_checkpoint
from revcol.distributed.fsdp import shard

GLOBAL_BATCH = 4
TOLERANCE = 1e-5  # float32; FSDP and one process differ only in summation order
BF16_TOLERANCE = 0.05  # relative error of the whole gradient vector under bfloat16 compute


def _loss(outputs, weights) -> torch.Tensor:
    return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)) / outputs[0].shape[0]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _relative_errors(sharded: dict[str, torch.Tensor], full: dict[str, torch.Tensor], rank: int, world: int):
    """``relative_error`` of each sharded tensor (an FSDP2 DTensor) against the full one of the same name, from the
    local shards: each rank adds up its rows' squared norms of the difference and of the full tensor, and one
    all_reduce sums them (gathering each tensor instead takes one collective per tensor, most of the run's time)."""
    names = sorted(full)
    sums = torch.zeros(2, len(names), dtype=torch.float64)
    for i, name in enumerate(names):
        tensor = sharded[name]
        assert tuple(tensor.placements) == (Shard(0),), f"{name}: {tensor.placements}"
        chunks = torch.chunk(full[name], world, dim=0)  # how Shard(0) splits dim 0 over the ranks
        rows = chunks[rank] if rank < len(chunks) else full[name][:0]
        local = tensor.to_local()
        assert local.shape == rows.shape, f"{name}: local shard {tuple(local.shape)}, rows {tuple(rows.shape)}"
        sums[0, i] = (local.double() - rows.double()).square().sum()
        sums[1, i] = rows.double().square().sum()
    dist.all_reduce(sums)
    diff, scale = sums.sqrt()
    return {name: (d / s if s > 0 else d).item() for name, d, s in zip(names, diff, scale, strict=True)}


def _data(model, rank: int, world: int):
    x_global = make_input(GLOBAL_BATCH, 32, 64, dtype=torch.float32, seed=1)
    with torch.no_grad():
        w_global = output_weights(model.eval()(x_global))
    model.train()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return x_global, w_global, x_global[rows], [w[rows] for w in w_global]


def _reference_grads(reference, x_global, w_global, x_local, w_local, drop_path, seed, world):
    reference.zero_grad(set_to_none=True)
    if drop_path == 0:
        _loss(reference(x_global), w_global).backward()
    else:
        torch.manual_seed(seed)
        _loss(reference(x_local), w_local).backward()
        for p in reference.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    return {name: p.grad.clone() for name, p in reference.named_parameters()}


def check_fp32(rank: int, world: int, save_memory: bool, drop_path: float) -> None:
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=drop_path, dtype=torch.float32, seed=0)
    x_global, w_global, x_local, w_local = _data(model, rank, world)
    reference = copy.deepcopy(model)
    reference.save_memory = False
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    model.save_memory = save_memory
    shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    what = f"rank {rank}, save_memory={save_memory}, drop_path={drop_path}"
    for step in range(2):
        seed = 100 + rank + 10 * step
        expected = _reference_grads(reference, x_global, w_global, x_local, w_local, drop_path, seed, world)
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        _loss(model(x_local), w_local).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert set(grads) == set(expected), what
        for name, error in _relative_errors(grads, expected, rank, world).items():
            assert error <= TOLERANCE, f"{what}, step {step}, {name}: gradient relative error {error:.2e}"
        optimizer.step()
        ref_optimizer.step()
        params = {name: p.detach() for name, p in model.named_parameters()}
        reference_params = {name: p.detach() for name, p in reference.named_parameters()}
        for name, error in _relative_errors(params, reference_params, rank, world).items():
            assert error <= TOLERANCE, f"{what}, after step {step}, {name}: parameter relative error {error:.2e}"


def check_bf16(rank: int, world: int) -> None:
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=0.0, dtype=torch.float32, seed=0)
    x_global, w_global, x_local, w_local = _data(model, rank, world)
    reference = copy.deepcopy(model)
    expected = _reference_grads(reference, x_global, w_global, x_local, w_local, 0.0, 0, world)
    shard(model, mixed_precision=True)
    outputs = model(x_local)
    assert all(o.dtype == torch.bfloat16 for o in outputs)  # computed in bfloat16
    loss = _loss(outputs, w_local)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: _full(p.grad) for name, p in model.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())  # reduced and kept in float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the sharded master weights
    flat = torch.cat([grads[name].flatten() for name in expected])
    flat_expected = torch.cat([g.flatten() for g in expected.values()])
    error = relative_error(flat, flat_expected)
    assert error <= BF16_TOLERANCE, f"rank {rank}: bfloat16 gradient relative error {error:.2e}"


def write_checkpoint(rank: int, world: int, out: Path) -> None:
    """One trained step, then the sharded checkpoint (all ranks, replacing the one of step 0) and the full state
    dict (rank 0); the checkpoint loads back into another sharded model."""
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=0.2, dtype=torch.float32, seed=0)
    _, _, x_local, w_local = _data(model, rank, world)
    shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(out / "sharded", model, None, {"step": 0})
    torch.manual_seed(rank)
    _loss(model(x_local), w_local).backward()
    optimizer.step()
    save_checkpoint(out / "sharded", model, optimizer, {"step": 1})
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if rank == 0:
        torch.save(full, out / "full.pt")
    other = shard(make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=0.2, dtype=torch.float32, seed=5))
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(out / "sharded", other, other_optimizer) == {"step": 1}
    loaded = get_model_state_dict(other, options=options)
    assert all(torch.equal(loaded[name], value) for name, value in full.items()), f"rank {rank}: sharded load"
    moments = [_full(s["exp_avg"]) for s in other_optimizer.state.values()]
    expected = [_full(s["exp_avg"]) for s in optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, expected, strict=True)), f"rank {rank}: optimizer state"
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for save_memory in (True, False):
            for drop_path in (0.0, 0.3):
                check_fp32(rank, world, save_memory, drop_path)
        check_bf16(rank, world)
        write_checkpoint(rank, world, args.out)
        print(f"RANK {rank} OK world {world} node {os.environ.get('GROUP_RANK')}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
