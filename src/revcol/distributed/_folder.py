"""A ``torch.distributed.checkpoint`` folder that is replaced whole, checked, and read without running code.

What each piece guards against, and why torch's own reader and planner do not: ``docs/scaling.md``, "What a
checkpoint folder guarantees". ``revcol.distributed`` holds the public ``save_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from revcol._atomic import fsync_folder, write_atomically
from revcol.checkpoints.files import refused_globals
from revcol.checkpoints.messages import describe
from revcol.errors import CheckpointError

MODEL_KEY, OPTIMIZER_KEY, EXTRA_KEY = "model", "optimizer", "extra"
CHECKSUMS = ".revcol-checksums.json"  # the CRC-32 of each shard file, written before the folder is swapped in
CHUNK_BYTES = 1 << 20


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


class Refused(pickle.UnpicklingError):
    """A checkpoint file that pickles something other than data, which would run code if unpickled."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name not in _METADATA_GLOBALS.get(module, ()):
            raise Refused(f"its .metadata pickles {module}.{name}, which is not a class of checkpoint metadata")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose ``.metadata`` is unpickled with only the metadata classes allowed.

    Read once and kept: ``load_checkpoint`` checks the metadata before loading, and DCP's load asks for it again.
    """

    _metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f".metadata holds a {type(metadata).__name__}, not a checkpoint's Metadata")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            # a shard is a file of this folder: a path elsewhere would make DCP read any file as tensor data
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise Refused(f"its .metadata names the shard file {name!r}, which is not a file of this folder")
        return metadata


class WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that reads the non-tensor values (``extra``, optimizer settings) weights-only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            refused = refused_globals(value)
            what = refused[0] if refused else "more than plain data"
            raise Refused(f"{fqn} pickles {what}, which a weights-only torch.load does not allow") from None
        put(self.original_state_dict, self.mappings[fqn], loaded)


def staging_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.incoming")


def _previous_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous")


def _complete(folder: Path) -> bool:
    # DCP writes .metadata last, once every rank's shards are written
    return (folder / ".metadata").is_file()


def complete_copy(path: Path) -> Path:
    """``path``, or where a save killed while swapping folders left the newest complete checkpoint."""
    if _complete(path):
        return path
    target = Path(os.path.abspath(path))
    return next((c for c in (staging_folder(target), _previous_folder(target)) if _complete(c)), path)


def _only_dcp_files(folder: Path) -> bool:
    return all(p.name.endswith(".distcp") or p.name.startswith((".metadata", CHECKSUMS)) for p in folder.iterdir())


def prepare(target: Path) -> None:
    """Finish or undo what an interrupted save left, so that ``target`` is the newest complete checkpoint."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a checkpoint folder")
    if target.is_dir() and not _complete(target) and not _only_dcp_files(target):
        raise CheckpointError(
            f"{target} holds files of something other than a checkpoint; save_checkpoint replaces the folder "
            "it writes, so give it a new folder or a checkpoint folder"
        )
    staging, previous = staging_folder(target), _previous_folder(target)
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


def swap(target: Path) -> None:
    """Put the complete staging folder in the place of ``target``; at every instant one complete copy exists."""
    staging, previous = staging_folder(target), _previous_folder(target)
    checksums = {file.name: _crc32(file) for file in sorted(staging.glob("*.distcp"))}
    write_atomically(staging / CHECKSUMS, json.dumps(checksums, indent=0).encode())  # also syncs the folder
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


def verify_checksums(folder: Path) -> None:
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
        raise CheckpointError(f"{folder} is damaged: its {CHECKSUMS} cannot be read ({describe(e)})") from None
    for name, expected in checksums.items():
        shard = folder / Path(str(name)).name
        if not shard.is_file():
            raise CheckpointError(f"{folder} is damaged: {shard.name} is missing")
        if _crc32(shard) != expected:
            raise CheckpointError(
                f"{folder} is damaged: {shard.name} does not match the CRC-32 recorded when it was saved; "
                "nothing was loaded"
            )


def on_rank_zero(step: Callable[[Path], None], target: Path) -> None:
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
            error = f"{target} was not written: {describe(e)}"
    if distributed:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise CheckpointError(error)


def fresh(state: Any) -> Any:
    """A copy of a (nested) state dict with new, uninitialised tensors of the same kind (DTensors stay sharded)."""
    if isinstance(state, torch.Tensor):
        return torch.empty_like(state)
    if isinstance(state, Mapping):
        return {key: fresh(value) for key, value in state.items()}
    if isinstance(state, list):
        return [fresh(value) for value in state]
    return state


def extra_value_paths(metadata: Metadata) -> list[tuple[Any, ...]]:
    """Where each ``extra`` value sits in the saved state (nested dicts of ``extra`` are flattened by DCP)."""
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths = []
    for key in metadata.state_dict_metadata:
        if key.startswith(f"{EXTRA_KEY}."):
            keys = mappings.get(key)
            valid = isinstance(keys, tuple) and len(keys) > 1 and keys[0] == EXTRA_KEY
            paths.append(keys if valid else (EXTRA_KEY, key.removeprefix(f"{EXTRA_KEY}.")))
    return paths


def put(root: Any, keys: tuple[Any, ...], value: Any) -> None:
    node = root
    for key in keys[:-1]:
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    node[keys[-1]] = value


def underlying(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (a ``BaseException``), else ``error``."""
    while isinstance(error, dcp.CheckpointException) and error.failures:
        error = error.failures[min(error.failures)][0]
    return error
