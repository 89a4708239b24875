"""FSDP2 (``revcol.distributed``) as a user runs it: ``torchrun`` processes on CPU, gloo on 127.0.0.1.

The ranks (``tests/helpers/fsdp_worker.py``) check gradients and parameters against a single-process run; this file
launches them on one node (2 ranks) and on two nodes of one rank each (two ``torchrun`` agents meeting at a
loopback rendezvous), then loads the sharded checkpoint they wrote into an unsharded model here, on one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.models import TINY_CHANNELS, make_net
from helpers.processes import free_port, revcol_env

from revcol import CheckpointError, ConfigError
from revcol.distributed.checkpoints import load_checkpoint, save_checkpoint
from revcol.distributed.fsdp import cpu_fsdp_supported, shard

WORKER = Path(__file__).resolve().parent / "helpers" / "fsdp_worker.py"
TIMEOUT = 180  # seconds for one launch, all its ranks (about 15 s on 2 busy cores)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
# torch 2.6's fully_shard cannot run on CPU tensors; there, shard() must say so (test_old_torch_refuses_cpu_fsdp).
needs_cpu_fsdp = pytest.mark.skipif(not cpu_fsdp_supported(), reason="this torch's FSDP2 does not run on the CPU")


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(WORKER)]


def _launch(commands: list[list[str]], out: Path, tmp_path: Path) -> list[str]:
    """Start every command in its own process group; wait for all, killing all of them on failure or timeout."""
    env = revcol_env(tmp_path, tests_on_path=True) | {"OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*command, "--out", str(out)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    return outputs


def _check_checkpoint(out: Path) -> None:
    """The sharded checkpoint, loaded into an unsharded model on this one process, equals the full state dict."""
    full = torch.load(out / "full.pt", weights_only=True)
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=0.2, dtype=torch.float32, seed=5)
    assert not torch.equal(model.stem[0].weight, full["stem.0.weight"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extra = load_checkpoint(out / "sharded", model, optimizer)
    assert extra == {"step": 1}
    state = model.state_dict()
    assert sorted(state) == sorted(full)
    for name, value in full.items():
        assert torch.equal(state[name], value), name
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert len(moments) == len(full) and any(m.abs().sum() > 0 for m in moments)


@needs_cpu_fsdp
def test_two_ranks_on_one_node(tmp_path):
    out = tmp_path / "out"
    port = free_port()
    (output,) = _launch(
        [_torchrun("--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))],
        out,
        tmp_path,
    )
    assert "RANK 0 OK world 2" in output and "RANK 1 OK world 2" in output, output
    _check_checkpoint(out)


@needs_cpu_fsdp
def test_two_nodes_of_one_rank_each(tmp_path):
    out = tmp_path / "out"
    port = free_port()
    nodes = [
        _torchrun(
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "revcol-fsdp-test",
        )
        for node in range(2)
    ]  # fmt: skip
    outputs = _launch(nodes, out, tmp_path)
    text = "\n".join(outputs)
    assert "RANK 0 OK world 2" in text and "RANK 1 OK world 2" in text, text
    assert {"node 0", "node 1"} <= {line.split(" world 2 ")[-1] for line in text.splitlines() if " OK " in line}
    _check_checkpoint(out)


@pytest.mark.skipif(cpu_fsdp_supported(), reason="this torch's FSDP2 runs on the CPU (tested above)")
def test_old_torch_refuses_cpu_fsdp():
    model = make_net(dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"FSDP2 on the CPU does not work with torch 2\.6.*record_event"):
        shard(model)
    assert not any(hasattr(m, "unshard") for m in model.modules())  # nothing was sharded


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "ck", make_net(dtype=torch.float32))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint of another model: 64 tensors of this model missing from it \[subnet2\.alpha0",
    ):
        load_checkpoint(tmp_path / "ck", make_net(num_subnet=3, dtype=torch.float32))
    wider = make_net(channels=(*TINY_CHANNELS[:-1], 40), dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"checkpoint of another model: \S+ has shape"):
        load_checkpoint(tmp_path / "ck", wider)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        model = make_net(dtype=torch.float32)
        load_checkpoint(tmp_path / "ck", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match=r"not a torch\.distributed\.checkpoint folder"):
        load_checkpoint(tmp_path, make_net(dtype=torch.float32))


def test_shard_needs_one_backbone_and_a_valid_policy():
    with pytest.raises(ConfigError, match=r"exactly one RevCol backbone \(FullNet\), found 0 in Linear"):
        shard(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="mixed_precision must be True, False or a MixedPrecisionPolicy"):
        shard(make_net(num_subnet=1), mixed_precision="bf16")
