"""Reading a checkpoint file without running code: ``torch.save`` files (zip and legacy) and safetensors files,
each checked for damage (``docs/reliability.md``, "Checkpoint files")."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import pickletools
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors
import safetensors.torch
import torch

from revcol.checkpoints._numpy_meta import NUMPY_GLOBALS, PatchedFile, numpy_patches, reading
from revcol.errors import CheckpointError

WRAPPER_KEYS = ("model", "state_dict")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save (default format)


PICKLE_MAGIC = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle, protocol >= 2


LEGACY_PICKLES = 4  # a legacy file is four pickles in a row: magic number, protocol, system info, then the object


SAFETENSORS_SUFFIX = ".safetensors"


CHUNK_BYTES = 1 << 20


SHA256_KEY = "revcol.sha256"  # save_backbone's safetensors metadata: the digest of the tensors (_tensor_digest)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``~`` expanded); its state dict without ``module.`` prefixes.

    A ``torch.save`` file is read with ``weights_only=True`` after its zip checksums are verified; numpy values in
    its metadata are read as inert placeholders (``revcol._numpy_meta``). A safetensors file (``save_backbone``,
    ``save_for_hf``, the Hugging Face Hub) is read with ``safetensors.torch.load_file`` and checked against the
    SHA-256 that ``save_backbone`` records. The format is told by the content. ``mmap``: map the tensors of a
    zip-format torch file instead of reading them. What is verified, and against what: ``docs/reliability.md``.
    """
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path} is a broken symbolic link, not a checkpoint file") from None
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        # never opened: a FIFO would block the open, a device like /dev/zero would be read forever
        raise CheckpointError(f"{path} is {describe_kind(path)}, not a regular file: a checkpoint is a file")
    try:
        with path.open("rb") as file:
            head = file.read(9)
    except OSError as error:  # unreadable for this user, say
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if _is_safetensors(head, os.stat(path).st_size):
        return _checked_state(_read_safetensors(path), path)
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        kind = "an empty file" if not head else f"a file starting with {head[: len(ZIP_MAGIC)]!r}"
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, a safetensors file "
            f"starts with its header's length and '{{'; this is {kind}"
        )
    obj = _load_torch_file(path, zipped=head.startswith(ZIP_MAGIC), mmap=mmap)
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} holds no state dict: expected a dict of tensors, at top level or under {' / '.join(WRAPPER_KEYS)}"
        )
    return _checked_state(obj, path)


def _load_torch_file(path: Path, zipped: bool, mmap: bool) -> object:
    """``torch.load(weights_only=True)`` of a verified file, its allowed numpy globals renamed to placeholders."""
    try:
        with path.open("rb") as file:
            if zipped:
                file.seek(_verified_zip(file, path))
            patches = numpy_patches(file, count=1 if zipped else LEGACY_PICKLES)
            file.seek(0)
            with reading():
                if patches:  # mapping needs the file's own path, so the renamed stream is read instead
                    renamed = io.BufferedReader(PatchedFile(file, patches))
                    return torch.load(renamed, map_location="cpu", weights_only=True)
                if mmap and zipped:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                # a file object: recent torch sends a path ending in .safetensors to its safetensors reader
                return torch.load(file, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} was refused by weights-only loading ({_refusal(path)}): it is corrupt or holds objects "
            "other than tensors, plain containers and numpy scalars or arrays, possibly code that would run on load. "
            "Only state-dict checkpoints are accepted."
        ) from None
    except Exception as e:  # torch.load and pickletools raise many types on a damaged file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None


def _verified_zip(file: BinaryIO, path: Path) -> int:
    """Check a torch zip file's records (stored, checksums right); returns where its pickle's bytes start.

    torch itself reads neither checksums nor compressed records: bit rot would load as wrong weights, and a
    memory-mapped read would take a compressed record's bytes as tensor data. A record whose CRC-32 is 0 has none
    recorded (``torch.utils.serialization.config.save.compute_crc32 = False``) and is not checked.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
            pickles = [r for r in records if r.filename.endswith("/data.pkl") and r.filename.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is a zip archive but not a torch.save file: it has no data.pkl record")
            for record in records:
                if record.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path} is damaged or not written by torch.save: its record {record.filename} is compressed "
                        "(torch.save stores every record uncompressed)"
                    )
                if record.CRC:
                    with archive.open(record) as stream:  # zipfile compares the CRC-32 at the end of the record
                        while stream.read(CHUNK_BYTES):
                            pass
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {error}") from None
    file.seek(pickles[0].header_offset)
    header = file.read(30)  # a zip local file header: 30 bytes, then the name and the extra field
    if header[:4] != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt): no zip header at its data.pkl")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return pickles[0].header_offset + 30 + name_length + extra_length


def _checked_state(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` without ``module.`` prefixes; ``CheckpointError`` for two keys that would become one, or a tensor
    that cannot be a weight (sparse, quantized)."""
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name in stripped:
            raise CheckpointError(
                f"{path} holds both {name!r} and 'module.{name}': which one is the weight is ambiguous; keep one"
            )
        if value.layout != torch.strided or value.is_quantized:
            kind = "quantized" if value.is_quantized else str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{path}: {key} is a {kind} tensor; a weight must be a dense (strided) tensor")
        stripped[name] = value
    return stripped


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON (an object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return header_length <= size - 8


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            recorded = (file.metadata() or {}).get(SHA256_KEY)
        state = safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, json.JSONDecodeError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None
    if recorded is not None and recorded != _tensor_digest(state):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the SHA-256 recorded when it was saved")
    return state


def _tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state``'s (contiguous CPU) tensors, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def describe_kind(path: str | Path) -> str:
    """What is at ``path`` when it is not a regular file: "a directory", "a FIFO (named pipe)", "a symbolic link to
    a character device", "a broken symbolic link", ..."""
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ]
    link = os.path.islink(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symbolic link" if link else "nothing readable"
    kind = next((name for test, name in kinds if test(mode)), "an unknown kind of file")
    return f"a symbolic link to {kind}" if link else kind


def refused_globals(file: BinaryIO) -> list[str]:
    """The globals that the pickles of a ``torch.save`` file (zip or legacy format) name and weights-only loading
    does not allow, sorted: torch's own answer (``get_unsafe_globals_in_checkpoint``, which takes the pickles'
    opcodes apart without running them). Read from the file's start; a damaged pickle ends the list early.
    """
    file.seek(0)
    zipped = file.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    file.seek(0)
    names: set[str] = set()
    # torch and pickletools raise many types on a damaged pickle: the names found before it are the answer
    with contextlib.suppress(Exception):
        if zipped:
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        else:
            for data in _pickles(file, LEGACY_PICKLES):
                names.update(torch.serialization.get_unsafe_globals_in_checkpoint(_as_zip(data)))
    return sorted(names)


def _refusal(path: Path) -> str:
    """What weights-only loading refused in ``path``: the globals it does not allow, less the numpy names revcol
    reads as placeholders; a pickle that names none is damaged or uses opcodes that loading does not read."""
    with path.open("rb") as file:
        refused = [name for name in refused_globals(file) if name not in NUMPY_GLOBALS]
    if refused:
        return f"unsupported GLOBAL {', '.join(refused)}"
    return "it names no refused global: a damaged pickle, or opcodes weights-only loading does not read"


def _pickles(file: BinaryIO, count: int) -> Iterator[bytes]:
    """The bytes of the next ``count`` pickles of ``file`` (fewer at its end), found by their ``STOP`` opcodes."""
    for _ in range(count):
        start = file.tell()
        if not file.read(1):
            return
        file.seek(start)
        for _ in pickletools.genops(file):
            pass
        end = file.tell()
        file.seek(start)
        yield file.read(end - start)


def _as_zip(data: bytes) -> BinaryIO:
    """A pickle of a legacy file inside a minimal zip-format file, the only format torch's global listing reads:
    the pickle record and the version record torch's reader requires."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as writer:
        writer.writestr("archive/version", "3\n")
        writer.writestr("archive/data.pkl", data)
    archive.seek(0)
    return archive
