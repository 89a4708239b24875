"""A RevCol backbone's state in and out of checkpoint files (``docs/design.md``, section "Checkpoints").

Every load goes through one mechanism: read (``read_backbone``), check (``check_backbone_state``, and a ``HeadRule``
for a part outside the backbone), then one ``load_state_dict``. ``load_pretrained`` is that mechanism;
``revcol.load_weights`` (a ``pretrained=`` value) and ``revcol.load_classifier_weights`` (a timm classifier, its
head by a ``HeadRule``) are layers over it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from revcol._atomic import replace_atomically
from revcol.checkpoints.files import SAFETENSORS_SUFFIX, SHA256_KEY, _tensor_digest, read_checkpoint
from revcol.checkpoints.messages import describe, listed
from revcol.core.network import find_backbone
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
    held = f"its {len(state)} tensors include {listed(sorted(state))}" if state else "its state dict is empty"
    raise CheckpointError(
        f"{path} holds no RevCol backbone tensors: expected keys stem.* and subnet* (or backbone.stem.* and "
        f"backbone.subnet* in a detector checkpoint); {held}"
    )


@dataclass(frozen=True)
class HeadRule:
    """How a file fills a part of the model that the strict backbone check leaves out (a classifier's head).

    ``prefix``: that part's keys in the model's state dict (``"cls."``). ``pick(state, own, path)``: from the
    file's tensors and the part's own state (keys without ``prefix``), the ``{file key: part key}`` pairs to copy;
    it raises ``CheckpointError`` for a head that does not fit.
    """

    prefix: str
    pick: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], str | Path], dict[str, str]]


def load_pretrained(model: nn.Module, path: str | Path, head: HeadRule | None = None) -> LoadResult:
    """Copy a RevCol checkpoint's backbone weights into ``model`` (a ``FullNet``): the one loading mechanism.

    Reads the file (``read_backbone``: a detector checkpoint's backbone from under ``backbone.``), then checks and
    loads it (``load_backbone_state``). Strict on the backbone: every model tensor must be in the file with the
    same shape, and the file may hold no backbone tensor the model lacks. Other entries (classification heads such
    as ``cls.*``, a detector's neck and heads) are skipped, unless ``head`` says how one fills a part of ``model``.
    ``revcol.load_weights`` and ``revcol.load_classifier_weights`` load through this function. Raises
    ``CheckpointError`` (a ``ValueError``) saying what did not fit; ``model`` is then unchanged.
    """
    return load_backbone_state(model, read_backbone(path), path, head)


def load_backbone_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, head: HeadRule | None = None
) -> LoadResult:
    """The check and load of ``load_pretrained``, for a state dict already read from ``path`` (named in the errors).

    Everything is checked before anything is copied, so a file that does not fit leaves ``model`` as it was.
    """
    own = model.state_dict()
    backbone = {k: v for k, v in own.items() if head is None or not k.startswith(head.prefix)}
    check_backbone_state(backbone, state, path)
    picked: dict[str, str] = {}  # file key -> model key, outside the backbone
    if head is not None:
        part = {k.removeprefix(head.prefix): v for k, v in own.items() if k.startswith(head.prefix)}
        picked = {key: head.prefix + name for key, name in head.pick(state, part, path).items()}
    tensors = {k: state[k] for k in backbone} | {name: state[key] for key, name in picked.items()}
    model.load_state_dict(tensors, strict=head is None)  # a head may keep some tensors of its own (a new Linear)
    return LoadResult(loaded=list(tensors), skipped=sorted(k for k in state if k not in backbone and k not in picked))


def check_backbone_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``CheckpointError`` unless ``state`` has exactly the backbone tensors of ``own`` (a model's state dict)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in own and k.startswith(BACKBONE_PREFIXES))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this RevCol configuration: "
            f"{len(missing)} backbone tensors missing from the file {listed(missing)}, "
            f"{len(unexpected)} backbone tensors the model does not have {listed(unexpected)}"
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
    backbone = find_backbone(model, "save_backbone", CheckpointError)
    state = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in backbone.state_dict().items()
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
            f"could not write {path} ({describe(error)}); the file that was there, if any, is unchanged"
        ) from None
    return path
