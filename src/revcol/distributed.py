"""RevCol under FSDP2: one ``fully_shard`` per column and the root, and ``torch.distributed.checkpoint`` files.

A column is the natural FSDP unit: its forward (plain or reversible) and the reversible backward's recompute use
only its own parameters, so FSDP gathers one column at a time, in forward and again in backward. The recipe and
the memory per rank are in ``docs/scaling.md``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from revcol._atomic import fsync_folder, write_atomically
from revcol.errors import CheckpointError, ConfigError
from revcol.model import FullNet

__all__ = ["BF16_POLICY", "cpu_fsdp_supported", "load_checkpoint", "save_checkpoint", "shard"]

# bfloat16 compute and all-gathers; gradients reduced, and kept, in float32.
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
MODEL_KEY, OPTIMIZER_KEY, EXTRA_KEY = "model", "optimizer", "extra"
CHECKSUMS = ".revcol-checksums.json"  # the CRC-32 of each shard file, written before the folder is swapped in
CHUNK_BYTES = 1 << 20


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

    Call it on every rank. ``extra`` holds small plain values: numbers, strings, bools, None, and lists and dicts
    of them (an epoch, a step). The folder loads with ``load_checkpoint`` into the same model sharded over any
    number of ranks, or unsharded on one process. An existing checkpoint folder ``path`` is replaced whole, and
    only once the new one is complete: killed or failing (a full disk) at any point, ``path`` still loads, as the
    old checkpoint or the new one. A failure is a ``CheckpointError``.
    """
    shown = Path(path).expanduser()
    target = Path(os.path.abspath(shown))
    _on_rank_zero(_prepare, target)
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    state: dict[str, Any] = {MODEL_KEY: model_state, EXTRA_KEY: dict(extra or {})}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optimizer_state
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(_staging(target)))
    except (Exception, dcp.CheckpointException) as e:
        error = _underlying(e)
        if not isinstance(error, Exception):  # a rank was interrupted (KeyboardInterrupt, SystemExit)
            raise
        raise CheckpointError(f"{shown} was not written, the folder is as it was ({_describe(error)})") from error
    _on_rank_zero(_swap, target)
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
    folder = _complete_copy(path)
    _on_rank_zero(_verify_checksums, folder)
    try:
        metadata = _SafeReader(folder).read_metadata()
    except _Refused as e:
        raise CheckpointError(f"{folder} is not loaded: {e}") from None
    except Exception as e:  # a missing folder, a folder of something else, a damaged .metadata
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint folder ({_describe(e)})") from None
    saved = metadata.state_dict_metadata
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    _check_model_entries(path, saved, model_state)
    # DCP writes into the tensors it is given and can fail halfway, so it fills copies; the model and the
    # optimizer take them only once everything was read.
    state: dict[str, Any] = {MODEL_KEY: _fresh(model_state)}
    extra_paths = _extra_paths(metadata)
    if extra_paths:
        state[EXTRA_KEY] = {}
        for keys in extra_paths:
            _put(state, keys, None)
    if optimizer is not None:
        if not any(key.startswith(f"{OPTIMIZER_KEY}.") for key in saved):
            raise CheckpointError(f"{path} holds no optimizer state, so the optimizer cannot be resumed from it")
        state[OPTIMIZER_KEY] = _fresh(optimizer_state)
    try:
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_WeightsOnlyPlanner())
    except (Exception, dcp.CheckpointException) as e:
        error = _underlying(e)
        if not isinstance(error, Exception):  # a rank was interrupted (KeyboardInterrupt, SystemExit)
            raise
        if isinstance(error, _Refused):
            raise CheckpointError(f"{folder} is not loaded: {error}") from None
        raise CheckpointError(f"{folder} could not be read, nothing was loaded ({_describe(error)})") from error
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


# Every global a ``.metadata`` file of torch.distributed.checkpoint pickles (found with pickletools): its
# dataclasses, the file offsets of FileSystemWriter, tensor sizes, dtypes, layouts (looked up by name), memory
# formats (an enum), and the folder path the writer records (pathlib's classes live in pathlib._local from
# Python 3.13). These build data and nothing else; unpickling any other global could call code, so it is refused.
_PATHS = frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"})
_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"} | {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": _PATHS,
    "pathlib._local": _PATHS,
}
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


class _Refused(pickle.UnpicklingError):
    """A checkpoint file that pickles something other than data, which would run code if unpickled."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name not in _METADATA_GLOBALS.get(module, ()):
            raise _Refused(f"its .metadata pickles {module}.{name}, which is not a class of checkpoint metadata")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose ``.metadata`` is unpickled with only the metadata classes allowed."""

    def read_metadata(self) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f".metadata holds a {type(metadata).__name__}, not a checkpoint's Metadata")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            # a shard is a file of this folder: a path elsewhere would make DCP read any file as tensor data
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise _Refused(f"its .metadata names the shard file {name!r}, which is not a file of this folder")
        return metadata


class _WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that reads the non-tensor values (``extra``, optimizer settings) weights-only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _REFUSED_GLOBAL.search(str(e))
            what = refused[1] if refused else "more than plain data"
            raise _Refused(f"{fqn} pickles {what}, which a weights-only torch.load does not allow") from None
        _put(self.original_state_dict, self.mappings[fqn], loaded)


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.incoming")


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _complete(folder: Path) -> bool:
    # DCP writes .metadata last, once every rank's shards are written
    return (folder / ".metadata").is_file()


def _complete_copy(path: Path) -> Path:
    """``path``, or where a save killed while swapping folders left the newest complete checkpoint."""
    if _complete(path):
        return path
    target = Path(os.path.abspath(path))
    return next((c for c in (_staging(target), _previous(target)) if _complete(c)), path)


def _only_dcp_files(folder: Path) -> bool:
    return all(p.name.endswith(".distcp") or p.name.startswith((".metadata", CHECKSUMS)) for p in folder.iterdir())


def _prepare(target: Path) -> None:
    """Finish or undo what an interrupted save left, so that ``target`` is the newest complete checkpoint."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a checkpoint folder")
    if target.is_dir() and not _complete(target) and not _only_dcp_files(target):
        raise CheckpointError(
            f"{target} holds files of something other than a checkpoint; save_checkpoint replaces the folder "
            "it writes, so give it a new folder or a checkpoint folder"
        )
    staging, previous = _staging(target), _previous(target)
    if not _complete(target):
        newest = next((c for c in (staging, previous) if _complete(c)), None)
        if newest is not None:
            if target.exists():
                shutil.rmtree(target)
            newest.rename(target)
            fsync_folder(target.parent)
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)


def _swap(target: Path) -> None:
    """Put the complete staging folder in the place of ``target``; at every instant one complete copy exists."""
    staging, previous = _staging(target), _previous(target)
    checksums = {file.name: _crc32(file) for file in sorted(staging.glob("*.distcp"))}
    write_atomically(staging / CHECKSUMS, json.dumps(checksums, indent=0).encode())
    fsync_folder(staging)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    fsync_folder(target.parent)
    shutil.rmtree(previous, ignore_errors=True)  # what is left, the next save removes


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def _verify_checksums(folder: Path) -> None:
    """``CheckpointError`` unless every shard file has the CRC-32 recorded when it was saved.

    DCP checks no checksum, so bit rot in a shard would load as wrong numbers. A folder without the record
    (written by an earlier revcol, or a save killed just before writing it) is not checked.
    """
    record = folder / CHECKSUMS
    if not record.is_file():
        return
    try:
        checksums = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} is damaged: its {CHECKSUMS} cannot be read ({_describe(e)})") from None
    for name, expected in checksums.items():
        shard = folder / Path(str(name)).name
        if not shard.is_file():
            raise CheckpointError(f"{folder} is damaged: {shard.name} is missing")
        if _crc32(shard) != expected:
            raise CheckpointError(
                f"{folder} is damaged: {shard.name} does not match the CRC-32 recorded when it was saved; "
                "nothing was loaded"
            )


def _on_rank_zero(step: Callable[[Path], None], target: Path) -> None:
    """Run ``step(target)`` on rank 0 once every rank got here; every rank raises its error, if any."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            step(target)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:
            error = f"{target} was not written: {_describe(e)}"
    if distributed:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise CheckpointError(error)


def _fresh(state: Any) -> Any:
    """A copy of a (nested) state dict with new, uninitialised tensors of the same kind (DTensors stay sharded)."""
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    if isinstance(state, Mapping):
        return {key: _fresh(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_fresh(value) for value in state]
    return state


def _extra_paths(metadata: Metadata) -> list[tuple[Any, ...]]:
    """Where each ``extra`` value sits in the saved state (nested dicts of ``extra`` are flattened by DCP)."""
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths = []
    for key in metadata.state_dict_metadata:
        if key.startswith(f"{EXTRA_KEY}."):
            keys = mappings.get(key)
            valid = isinstance(keys, tuple) and len(keys) > 1 and keys[0] == EXTRA_KEY
            paths.append(keys if valid else (EXTRA_KEY, key.removeprefix(f"{EXTRA_KEY}.")))
    return paths


def _put(root: Any, keys: tuple[Any, ...], value: Any) -> None:
    node = root
    for key in keys[:-1]:
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    node[keys[-1]] = value


def _underlying(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (a ``BaseException``), else ``error``."""
    while isinstance(error, dcp.CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    return error


def _describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
