"""DistributedDataParallel over 2 CPU processes (gloo) with the reversible path.

How the comparison is made exact:

* ``drop_path = 0``: DDP averages the ranks' gradients of their half-batch mean losses, which is
  the gradient of the full-batch mean loss (there is no BatchNorm). Every parameter's DDP gradient
  must equal a single-process plain-autograd run on the whole global batch.
* ``drop_path > 0``: drop-path draws one mask per sample from the generator of the process that runs
  it, so a 2-rank run and a 1-process run on the same global batch draw different masks and cannot
  be compared element for element. Instead each rank, with its own seed, also computes the plain
  autograd gradient of its half-batch on an undistributed copy of the model (same seed, so the
  same masks); the mean of those over the ranks (``all_reduce``) is what DDP must produce.

Both are run with ``find_unused_parameters`` False and True, for two iterations with an optimizer
step in between (a parameter "marked ready twice" or reported unused fails the run).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.models import make_input, make_net
from helpers.processes import free_port
from torch.nn.parallel import DistributedDataParallel

from revcol.diagnostics import output_weights, relative_error

WORLD = 2
GLOBAL_BATCH = 4
TOLERANCE = 1e-5  # float32; the gradients differ only by summation order


def _loss(outputs, weights) -> torch.Tensor:
    """Mean over the batch of a fixed random linear functional of the four outputs."""
    n = outputs[0].shape[0]
    return sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)) / n


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _check(rank: int, drop_path: float, find_unused: bool) -> None:
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=drop_path, dtype=torch.float32, seed=0)
    x_global = make_input(GLOBAL_BATCH, 32, 64, dtype=torch.float32, seed=1)
    with torch.no_grad():
        w_global = output_weights(model.eval()(x_global))
    model.train()
    rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    x_local, w_local = x_global[rows], [w[rows] for w in w_global]
    seed = 100 + rank

    reference = copy.deepcopy(model)
    reference.save_memory = False
    if drop_path == 0:
        _loss(reference(x_global), w_global).backward()
        expected = _grads(reference)
    else:
        torch.manual_seed(seed)
        _loss(reference(x_local), w_local).backward()
        expected = _grads(reference)
        for g in expected.values():
            dist.all_reduce(g)
            g /= WORLD

    model.save_memory = True
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed + 10 * step)
        _loss(ddp(x_local), w_local).backward()
        grads = _grads(model)  # raises if some parameter got no gradient
        assert all(torch.isfinite(g).all() for g in grads.values())
        if step == 0:
            assert set(grads) == set(expected)
            for name, g in grads.items():
                error = relative_error(g, expected[name])
                assert error <= TOLERANCE, f"rank {rank}, {name}: relative error {error:.2e}"
            # the ranks hold identical averaged gradients
            first = torch.cat([g.flatten() for g in grads.values()])
            other = first.clone()
            dist.broadcast(other, src=0)
            assert torch.equal(first, other)
        optimizer.step()


def _worker(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for drop_path in (0.0, 0.3):
            for find_unused in (False, True):
                _check(rank, drop_path, find_unused)
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_reversible_gradients_match_single_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
