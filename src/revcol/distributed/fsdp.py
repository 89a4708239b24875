"""RevCol under FSDP2: one ``fully_shard`` per column and the root, and ``torch.distributed.checkpoint`` files.

A column is the natural FSDP unit: its forward (plain or reversible) and the reversible backward's recompute use
only its own parameters, so FSDP gathers one column at a time, in forward and again in backward. The recipe and
the memory per rank are in ``docs/scaling.md``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from revcol.core.network import find_backbone
from revcol.distributed.checkpoints import BF16_POLICY
from revcol.errors import ConfigError


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
    backbone = find_backbone(model, "revcol.distributed.shard")
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
