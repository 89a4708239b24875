"""RevCol under FSDP2: one ``fully_shard`` per column and the root, and ``torch.distributed.checkpoint`` files.

A column is the natural FSDP unit: its forward (plain or reversible) and the reversible backward's recompute use
only its own parameters, so FSDP gathers one column at a time, in forward and again in backward. The recipe and
the memory per rank are in ``docs/scaling.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from revcol.errors import CheckpointError, ConfigError
from revcol.model import FullNet

__all__ = ["BF16_POLICY", "cpu_fsdp_supported", "load_checkpoint", "save_checkpoint", "shard"]

# bfloat16 compute and all-gathers; gradients reduced, and kept, in float32.
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
MODEL_KEY, OPTIMIZER_KEY, EXTRA_KEY = "model", "optimizer", "extra"


def _backbone(model: nn.Module) -> FullNet:
    backbones = [m for m in model.modules() if isinstance(m, FullNet)]
    if len(backbones) != 1:
        raise ConfigError(
            f"revcol.distributed.shard needs a module holding exactly one RevCol backbone (FullNet), found "
            f"{len(backbones)} in {type(model).__name__}"
        )
    return backbones[0]


def shard(
    model: nn.Module,
    *,
    mesh: Any = None,
    mixed_precision: bool | MixedPrecisionPolicy = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to ``model`` (a ``FullNet``, a timm RevCol classifier, or a module holding one backbone).

    Every column gets its own ``fully_shard``, then the root (stem, head and anything else). ``mesh`` is a
    ``DeviceMesh`` (default: all ranks of the default process group); ``mixed_precision`` is True for
    ``BF16_POLICY`` or a ``MixedPrecisionPolicy``. Call it after moving the model to its device and before
    building the optimizer. Returns ``model``, sharded in place.
    """
    backbone = _backbone(model)
    if isinstance(mixed_precision, bool):
        policy = BF16_POLICY if mixed_precision else MixedPrecisionPolicy()
    elif isinstance(mixed_precision, MixedPrecisionPolicy):
        policy = mixed_precision
    else:
        raise ConfigError(f"mixed_precision must be True, False or a MixedPrecisionPolicy, got {mixed_precision!r}")
    if not cpu_fsdp_supported() and any(p.device.type == "cpu" for p in model.parameters()):
        raise ConfigError(
            f"FSDP2 on the CPU does not work with torch {torch.__version__}: its fully_shard records events on "
            "torch.cpu.Stream, which this release lacks (torch.cpu.Stream.record_event). Shard a model on CUDA, "
            "or use a newer torch for CPU (gloo) runs."
        )
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward}
    for column in backbone.subnets:
        fully_shard(column, **options)
    fully_shard(model, **options)
    return model


def cpu_fsdp_supported() -> bool:
    """Whether this torch's ``fully_shard`` runs on CPU tensors (torch 2.6's does not: its CPU stream has no events)."""
    return hasattr(torch.cpu.Stream, "record_event")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sharded checkpoint (every rank its shards) of ``model``, ``optimizer`` and ``extra`` to folder ``path``.

    Call it on every rank. ``extra`` holds small picklable values (an epoch, a step). The folder loads with
    ``load_checkpoint`` into the same model sharded over any number of ranks, or unsharded on one process.
    """
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    state: dict[str, Any] = {MODEL_KEY: model_state, EXTRA_KEY: dict(extra or {})}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optimizer_state
    dcp.save(state, checkpoint_id=Path(path))
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a ``save_checkpoint`` folder into ``model`` (and ``optimizer``); returns its ``extra`` values.

    Works sharded (call it on every rank) and on one process without a process group. The folder must hold
    this model: the same tensor names and shapes, else ``CheckpointError``, before anything is loaded.
    """
    path = Path(path).expanduser()
    try:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # a missing folder, a folder of something else, a damaged .metadata
        raise CheckpointError(
            f"{path} is not a torch.distributed.checkpoint folder ({type(e).__name__}: {e})"
        ) from None
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    _check_model_entries(path, saved, model_state)
    state: dict[str, Any] = {MODEL_KEY: model_state}
    if any(key.startswith(f"{EXTRA_KEY}.") for key in saved):
        state[EXTRA_KEY] = {key.split(".", 2)[1]: None for key in saved if key.startswith(f"{EXTRA_KEY}.")}
    if optimizer is not None:
        if not any(key.startswith(f"{OPTIMIZER_KEY}.") for key in saved):
            raise CheckpointError(f"{path} holds no optimizer state, so the optimizer cannot be resumed from it")
        state[OPTIMIZER_KEY] = optimizer_state
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        [] if optimizer is None else [optimizer],
        model_state_dict=state[MODEL_KEY],
        optim_state_dict=state.get(OPTIMIZER_KEY, {}),
    )
    return dict(state.get(EXTRA_KEY, {}))


def _check_model_entries(path: Path, saved: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    prefix = f"{MODEL_KEY}."
    stored = {key.removeprefix(prefix): meta for key, meta in saved.items() if key.startswith(prefix)}
    missing = sorted(set(model_state) - set(stored))
    unexpected = sorted(set(stored) - set(model_state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is a checkpoint of another model: {len(missing)} tensors of this model missing from it "
            f"{_head(missing)}, {len(unexpected)} tensors this model does not have {_head(unexpected)}"
        )
    for key, value in model_state.items():
        size = getattr(stored[key], "size", None)
        if size is not None and tuple(size) != tuple(value.shape):
            raise CheckpointError(
                f"{path} is a checkpoint of another model: {key} has shape {tuple(size)} there, "
                f"{tuple(value.shape)} here"
            )


def _head(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
