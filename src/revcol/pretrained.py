"""Loading the authors' ImageNet checkpoints into a RevCol backbone (``docs/design.md``, section "Checkpoints")."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from revcol.allow_list import SharedAllowList
from revcol.errors import CheckpointError
from revcol.model import FullNet

BACKBONE_PREFIXES = ("stem.", "subnet")
DETECTOR_PREFIX = "backbone."  # where mmdet detectors (the authors' COCO files) keep the backbone
WRAPPER_KEYS = ("model", "state_dict")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save (default format)
PICKLE_MAGIC = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle, protocol >= 2
SAFETENSORS_SUFFIX = ".safetensors"
# numpy pickles its scalars and arrays through these reconstructors, under numpy.core (files written by numpy 1, as
# mmcv-era checkpoints' meta may be: an EvalHook's best score, a palette) or numpy._core (numpy 2).
NUMPY_PICKLE_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
NUMPY_RECONSTRUCTORS = ("scalar", "_reconstruct")


@dataclass
class LoadResult:
    """Names of the tensors copied into the model and of those in the file that were not used."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``~`` expanded); its state dict without ``module.`` prefixes.

    A ``torch.save`` file is read with ``weights_only=True``, a safetensors file (``save_for_hf``, the Hugging
    Face Hub, ``save_backbone``) with ``safetensors.torch.load_file``; the format is told by the content.
    ``mmap``: map the tensors of a zip-format torch file instead of reading them (to check a file cheaply).
    """
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
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
        return _strip_module(_read_safetensors(path))
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        kind = "an empty file" if not head else f"a file starting with {head[: len(ZIP_MAGIC)]!r}"
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, a safetensors file "
            f"starts with its header's length and '{{'; this is {kind}"
        )
    try:
        with NUMPY_DATA.allowed():
            if mmap and head.startswith(ZIP_MAGIC):  # mapping needs the path
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:  # a file object: recent torch sends a path ending in .safetensors to its safetensors reader
                with path.open("rb") as file:
                    obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused by weights-only loading ({_unpickler_reason(e)}): it is corrupt or holds objects "
            "other than tensors, plain containers and numpy scalars or arrays, possibly code that would run on load. "
            "Only state-dict checkpoints are accepted."
        ) from None
    except Exception as e:  # torch.load raises many types (RuntimeError, EOFError, KeyError, ...) on a damaged file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None
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
    return _strip_module(obj)


def numpy_data_globals() -> list[tuple[Callable, str]]:
    """What weights-only loading needs besides its defaults to read numpy scalars, arrays and dtypes: data only.

    Each reconstructor is listed under the module names of both numpy generations, so that a file pickled by either
    resolves with the installed one. An object array's elements still pass the weights-only checks one by one.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    named = [(getattr(multiarray, n), f"{m}.{n}") for m in NUMPY_PICKLE_MODULES for n in NUMPY_RECONSTRUCTORS]
    # numpy >= 1.25 pickles a dtype's class (numpy.dtypes.Float64DType, ...) beside numpy.dtype
    classes = {np.ndarray, np.dtype}
    classes |= {c for c in vars(getattr(np, "dtypes", np)).values() if isinstance(c, type) and issubclass(c, np.dtype)}
    return [(c, f"{c.__module__}.{c.__qualname__}") for c in classes] + named


NUMPY_DATA = SharedAllowList(numpy_data_globals())


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON (an object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return header_length <= size - 8


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, json.JSONDecodeError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None


def read_backbone(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """``read_checkpoint``, with a detector's ``backbone.`` prefix removed when the backbone sits only under it.

    Raises ``CheckpointError`` when the file holds no RevCol backbone tensor in either layout.
    """
    state = read_checkpoint(path, mmap=mmap)
    if any(k.startswith(BACKBONE_PREFIXES) for k in state):
        return state
    if any(k.removeprefix(DETECTOR_PREFIX).startswith(BACKBONE_PREFIXES) for k in state):
        return {k.removeprefix(DETECTOR_PREFIX): v for k, v in state.items()}
    held = f"its {len(state)} tensors include {_head(sorted(state))}" if state else "its state dict is empty"
    raise CheckpointError(
        f"{path} holds no RevCol backbone tensors: expected keys stem.* and subnet* (or backbone.stem.* and "
        f"backbone.subnet* in a detector checkpoint); {held}"
    )


def load_pretrained(model: nn.Module, path: str | Path) -> LoadResult:
    """Copy a RevCol checkpoint's backbone weights into ``model`` (a ``FullNet``).

    Strict on the backbone: every model tensor must be in the file with the same shape, and the file
    may hold no backbone tensor the model lacks. Other entries (classification heads such as
    ``cls.*``, a detector's neck and heads) are skipped. A detector checkpoint's backbone is read from
    under ``backbone.`` (``read_backbone``). Raises ``CheckpointError`` (a ``ValueError``) saying what did not fit.
    """
    return load_backbone_state(model, read_backbone(path), path)


def load_backbone_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> LoadResult:
    """``load_pretrained`` of a state dict already read from ``path`` (named in the errors)."""
    own = model.state_dict()
    check_backbone_state(own, state, path)
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return LoadResult(loaded=list(own), skipped=sorted(k for k in state if k not in own))


def check_backbone_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``CheckpointError`` unless ``state`` has exactly the backbone tensors of ``own`` (a model's state dict)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in own and k.startswith(BACKBONE_PREFIXES))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this RevCol configuration: "
            f"{len(missing)} backbone tensors missing from the file {_head(missing)}, "
            f"{len(unexpected)} backbone tensors the model does not have {_head(unexpected)}"
        )
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, model {tuple(value.shape)}"
            )
        # Any floating-point precision is converted on copy (float64 or bfloat16 files load into a float32
        # model); an integer or bool tensor in place of a weight is a file of something else.
        if state[key].dtype != value.dtype and not (state[key].is_floating_point() and value.is_floating_point()):
            raise CheckpointError(
                f"{path}: dtype mismatch for {key}: checkpoint {state[key].dtype}, model {value.dtype} "
                "(a floating-point tensor of any precision is accepted for a floating-point weight)"
            )


def describe_kind(path: str | Path) -> str:
    """What is at ``path`` when it is not a regular file: "a directory", "a FIFO", "a character device", ..."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "nothing readable"
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a broken symbolic link"),
    ]
    return next((name for test, name in kinds if test(mode)), "a regular file")


def save_backbone(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the RevCol backbone inside ``model`` to ``path``, in the key layout ``load_pretrained`` reads.

    ``model`` is a ``FullNet`` or any module holding exactly one (a timm ``RevColClassifier``, an Ultralytics
    model or its ``YOLO`` / ``RTDETR`` wrapper with a RevCol backbone). A ``.safetensors`` path writes a safetensors
    file, any other a ``torch.save`` file; either holds only ``stem.*`` and ``subnet*`` tensors, on the CPU.
    """
    backbones = [m for m in model.modules() if isinstance(m, FullNet)]
    # a FullNet holds no FullNet, so exactly one found means one backbone
    if len(backbones) != 1:
        raise CheckpointError(
            f"save_backbone needs a module holding exactly one RevCol backbone (FullNet), found {len(backbones)} "
            f"in {type(model).__name__}"
        )
    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in backbones[0].state_dict().items()
        if k.startswith(BACKBONE_PREFIXES)
    }
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        safetensors.torch.save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def _head(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"[{shown}]"


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The first sentence of what torch's weights-only refusal found, without its paragraphs of generic advice."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    generic = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = (line.strip() for line in text.splitlines())
    reason = " ".join(line for line in lines if line and not line.startswith(generic))
    return reason.split(". ", 1)[0].rstrip(".") or type(error).__name__
