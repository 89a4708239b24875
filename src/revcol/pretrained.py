"""Loading the authors' ImageNet checkpoints into a RevCol backbone (``docs/design.md``, section "Checkpoints")."""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from revcol.errors import CheckpointError

BACKBONE_PREFIXES = ("stem.", "subnet")
DETECTOR_PREFIX = "backbone."  # where mmdet detectors (the authors' COCO files) keep the backbone
WRAPPER_KEYS = ("model", "state_dict")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save (default format)
PICKLE_MAGIC = b"\x80"  # torch.save(_use_new_zipfile_serialization=False): a pickle, protocol >= 2


@dataclass
class LoadResult:
    """Names of the tensors copied into the model and of those in the file that were not used."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``~`` expanded) with ``weights_only=True``; its state dict without ``module.`` prefixes.

    ``mmap``: map the tensors of a zip-format file instead of reading them (to check a file cheaply).
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
            head = file.read(len(ZIP_MAGIC))
    except OSError as error:  # unreadable for this user, say
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        kind = "an empty file" if not head else f"a file starting with {head!r}"
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive or a pickle, this is {kind}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(ZIP_MAGIC))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused by weights-only loading ({_unpickler_reason(e)}): it is corrupt or holds objects "
            "other than tensors and plain containers, possibly code that would run on load. Only state-dict "
            "checkpoints are accepted."
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
    return {k.removeprefix("module."): v for k, v in obj.items()}


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
