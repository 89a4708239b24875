"""RevCol under FSDP2: one ``fully_shard`` per column and the root, and ``torch.distributed.checkpoint`` files.

A column is the natural FSDP unit: its forward (plain or reversible) and the reversible backward's recompute use
only its own parameters, so FSDP gathers one column at a time, in forward and again in backward. The recipe and
the memory per rank are in ``docs/scaling.md``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

from revcol.checkpoints.messages import describe, listed
from revcol.distributed._folder import (
    EXTRA_KEY,
    MODEL_KEY,
    OPTIMIZER_KEY,
    Refused,
    SafeReader,
    WeightsOnlyPlanner,
    complete_copy,
    extra_value_paths,
    fresh,
    on_rank_zero,
    prepare,
    put,
    staging_folder,
    swap,
    underlying,
    verify_checksums,
)
from revcol.errors import CheckpointError

# bfloat16 compute and all-gathers; gradients reduced, and kept, in float32.
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a sharded checkpoint (every rank its shards) of ``model``, ``optimizer`` and ``extra`` to folder ``path``.

    Call it on every rank. ``extra`` holds small plain values: numbers, strings, bools, None, and lists and dicts
    of them (an epoch, a step). The folder loads with ``load_checkpoint`` into the same model sharded over any
    number of ranks, or unsharded on one process. An existing checkpoint folder ``path`` is replaced whole, and
    only once the new one is complete: killed or failing (a full disk) at any point, ``path`` still loads, as the
    old checkpoint or the new one. A failure is a ``CheckpointError``.
    """
    shown = Path(path).expanduser()
    target = Path(os.path.abspath(shown))
    on_rank_zero(prepare, target)
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    state: dict[str, Any] = {MODEL_KEY: model_state, EXTRA_KEY: dict(extra or {})}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optimizer_state
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(staging_folder(target)))
    except (Exception, dcp.CheckpointException) as e:
        error = underlying(e)
        if not isinstance(error, Exception):  # a rank was interrupted (KeyboardInterrupt, SystemExit)
            raise
        raise CheckpointError(f"{shown} was not written, the folder is as it was ({describe(error)})") from error
    on_rank_zero(swap, target)
    return shown


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a ``save_checkpoint`` folder into ``model`` (and ``optimizer``); returns its ``extra`` values.

    Works sharded (call it on every rank) and on one process without a process group. The folder must hold
    this model: the same tensor names and shapes, else ``CheckpointError``, before anything is loaded. Any other
    failure (a damaged shard, a file that pickles more than plain data) is a ``CheckpointError`` too, and leaves
    ``model`` and ``optimizer`` as they were. No pickle that can call code is read.
    """
    path = Path(path).expanduser()
    folder = complete_copy(path)
    on_rank_zero(verify_checksums, folder)
    reader = SafeReader(folder)  # keeps the metadata it reads: checked here, then used by dcp.load
    try:
        metadata = reader.read_metadata()
    except Refused as e:
        raise CheckpointError(f"{folder} is not loaded: {e}") from None
    except Exception as e:  # a missing folder, a folder of something else, a damaged .metadata
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint folder ({describe(e)})") from None
    saved = metadata.state_dict_metadata
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    _check_model_entries(path, saved, model_state)
    # DCP writes into the tensors it is given and can fail halfway, so it fills copies; the model and the
    # optimizer take them only once everything was read.
    state: dict[str, Any] = {MODEL_KEY: fresh(model_state)}
    extra_paths = extra_value_paths(metadata)
    if extra_paths:
        state[EXTRA_KEY] = {}
        for keys in extra_paths:
            put(state, keys, None)
    if optimizer is not None:
        if not any(key.startswith(f"{OPTIMIZER_KEY}.") for key in saved):
            raise CheckpointError(f"{path} holds no optimizer state, so the optimizer cannot be resumed from it")
        state[OPTIMIZER_KEY] = fresh(optimizer_state)
    try:
        dcp.load(state, storage_reader=reader, planner=WeightsOnlyPlanner())
    except (Exception, dcp.CheckpointException) as e:
        error = underlying(e)
        if not isinstance(error, Exception):  # a rank was interrupted (KeyboardInterrupt, SystemExit)
            raise
        if isinstance(error, Refused):
            raise CheckpointError(f"{folder} is not loaded: {error}") from None
        raise CheckpointError(f"{folder} could not be read, nothing was loaded ({describe(error)})") from error
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
            f"{listed(missing)}, {len(unexpected)} tensors this model does not have {listed(unexpected)}"
        )
    for key, value in model_state.items():
        size = getattr(stored[key], "size", None)
        if size is not None and tuple(size) != tuple(value.shape):
            raise CheckpointError(
                f"{path} is a checkpoint of another model: {key} has shape {tuple(size)} there, "
                f"{tuple(value.shape)} here"
            )
