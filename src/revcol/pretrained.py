"""Loading the authors' ImageNet checkpoints into a RevCol backbone (design section 4)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

BACKBONE_PREFIXES = ("stem.", "subnet")
WRAPPER_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


@dataclass
class LoadResult:
    """Names of the tensors copied into the model and of those in the file that were not used."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True`` and return its state dict without ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused by weights-only loading: it holds objects other than tensors and plain "
            f"containers, possibly code that would run on load. Only state-dict checkpoints are accepted. ({e})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (empty, truncated or another kind of file): {e}"
        ) from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict: expected a dict of tensors, at top level or under "
            f"{' / '.join(WRAPPER_KEYS)}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> LoadResult:
    """Copy a RevCol checkpoint's backbone weights into ``model`` (a ``FullNet``).

    Strict on the backbone: every model tensor must be in the file with the same shape, and the file
    may hold no backbone tensor the model lacks. Other entries (classification heads such as
    ``cls.*``) are skipped. Raises ``CheckpointError`` (a ``ValueError``) saying what did not fit.
    """
    state = read_checkpoint(path)
    own = model.state_dict()
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
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return LoadResult(loaded=list(own), skipped=sorted(k for k in state if k not in own))


def _head(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"[{shown}]"
