"""Loading the authors' ImageNet checkpoints into a RevCol backbone (``docs/design.md``, section "Checkpoints")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from revcol._atomic import replace_atomically
from revcol.checkpoints.files import SAFETENSORS_SUFFIX, SHA256_KEY, _first_line, _head, _tensor_digest, read_checkpoint
from revcol.core.network import FullNet
from revcol.errors import CheckpointError

BACKBONE_PREFIXES = ("stem.", "subnet")


DETECTOR_PREFIX = "backbone."  # where mmdet detectors (the authors' COCO files) keep the backbone


@dataclass
class LoadResult:
    """Names of the tensors copied into the model and of those in the file that were not used."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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


def save_backbone(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the RevCol backbone inside ``model`` to ``path``, in the key layout ``load_pretrained`` reads.

    ``model`` is a ``FullNet`` or any module holding exactly one (a timm ``RevColClassifier``, an Ultralytics
    model or its ``YOLO`` / ``RTDETR`` wrapper with a RevCol backbone). A ``.safetensors`` path writes a safetensors
    file (with a SHA-256 of its tensors, checked when read), any other a ``torch.save`` file; either holds only
    ``stem.*`` and ``subnet*`` tensors, on the CPU. The file is replaced atomically: a kill or a full disk leaves the
    previous file whole (``CheckpointError`` for the failed write).
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

    def write(temporary: Path) -> None:
        if path.suffix == SAFETENSORS_SUFFIX:
            metadata = {"format": "pt", SHA256_KEY: _tensor_digest(state)}
            safetensors.torch.save_file(state, temporary, metadata=metadata)
        else:
            torch.save(state, temporary)

    try:
        replace_atomically(path, write)
    except (OSError, RuntimeError, safetensors.SafetensorError) as error:  # a full disk; torch.save: RuntimeError
        raise CheckpointError(
            f"could not write {path} ({_first_line(error)}); the file that was there, if any, is unchanged"
        ) from None
    return path
