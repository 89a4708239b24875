"""What a ``pretrained=`` value names, and loading it: the one path from the value to a loaded model.

``choose_pretrained`` decides what the value names (a published file or a local checkpoint) and the kernel size
that implies, from the table alone, before anything is built; ``load_chosen`` loads it. ``RevColBackbone`` (a
model-YAML row) and the timm models call the two; ``named_entry`` is the table look-up ``choose_pretrained`` makes;
``load_weights``, ``pretrained_kernel_size`` (which ``build_variant`` calls), ``backbone_options`` and ``resolve``
are thin layers over the two, for their callers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from revcol.checkpoints.backbone import LoadResult, check_backbone_state, load_pretrained, read_backbone
from revcol.core.network import FullNet
from revcol.core.variants import VARIANTS, VariantSpec, get_variant
from revcol.errors import CheckpointError, ConfigError
from revcol.weights.cache import cache_path, download
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

Pretrained = bool | str | os.PathLike | None


@dataclass(frozen=True)
class PretrainedChoice:
    """What a ``pretrained=`` value names (``choose_pretrained``): nothing, a published file (``entry``) or a local
    checkpoint (``path``); and the ``kernel_size`` to build with (``None``: the builder's default)."""

    entry: PublishedWeights | None = None
    path: Path | None = None
    kernel_size: int | None = None

    def checkpoint(self) -> Path | None:
        """The file to load: the published one, downloaded once into torch's hub cache, or the local path; ``None``
        when nothing is to be loaded."""
        return download(self.entry) if self.entry is not None else self.path


def choose_pretrained(variant: str | None, pretrained: Pretrained, kernel_size: int | None = None) -> PretrainedChoice:
    """What ``pretrained`` names for ``variant`` (``None``: a custom configuration), decided before anything is built.

    ``None`` or ``False``: nothing. ``True``: the variant's default published weights (``DEFAULT_TAGS``); one of its
    tags (``WEIGHTS``): that file (``named_entry``). Anything else is a local path (``~`` expanded), read when
    loaded. A published file fixes the kernel size (RevCol-H's ``megdata_k7`` and its UperNet file: 7):
    ``kernel_size`` may then only repeat it (``ConfigError`` otherwise); for a path or nothing it is kept as given.
    ``CheckpointError`` when ``pretrained`` names published weights that do not exist, without the network.
    """
    if pretrained is None or pretrained is False:
        return PretrainedChoice(kernel_size=kernel_size)
    entry = named_entry(variant, pretrained)
    if entry is None:
        return PretrainedChoice(path=Path(pretrained).expanduser(), kernel_size=kernel_size)
    if kernel_size is not None and kernel_size != entry.kernel_size:
        raise ConfigError(
            f"{variant} weights {entry.tag!r} ({entry.filename}) have {entry.kernel_size}x{entry.kernel_size} "
            f"depthwise kernels, so kernel_size must be {entry.kernel_size} (or left out), got {kernel_size!r}"
        )
    return PretrainedChoice(entry=entry, kernel_size=entry.kernel_size)


def load_chosen(
    model: nn.Module,
    choice: PretrainedChoice,
    loader: Callable[[nn.Module, Path], LoadResult] = load_pretrained,
) -> LoadResult | None:
    """Load what ``choice`` names into ``model`` with ``loader``; ``None`` when it names nothing.

    ``loader``: ``load_pretrained`` (the backbone, strictly), or ``revcol.load_classifier_weights`` for the timm
    models (the backbone the same way, and the classifier's head). A published file is downloaded here, once.
    """
    path = choice.checkpoint()
    return None if path is None else loader(model, path)


def load_weights(model: FullNet, variant: str | None, pretrained: Pretrained) -> LoadResult | None:
    """Load what ``pretrained`` names into ``model`` (variant ``variant``, ``None`` for a custom configuration).

    ``True``: the variant's default published weights; one of its tags (``revcol.weights.WEIGHTS``): those;
    anything else: a checkpoint path. Published files are downloaded once into torch's hub cache.
    ``None`` or ``False``: nothing is loaded. ``choose_pretrained``, then ``load_chosen`` (``load_pretrained``).
    """
    return load_chosen(model, choose_pretrained(variant, pretrained))


def pretrained_kernel_size(variant: str | None, pretrained: Pretrained, kernel_size: int | None) -> int | None:
    """The ``kernel_size`` to build ``variant`` with for ``pretrained``: that of ``choose_pretrained``."""
    return choose_pretrained(variant, pretrained, kernel_size).kernel_size


def backbone_options(variant: str | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model-YAML row's options with the kernel size its ``pretrained`` implies filled in (``choose_pretrained``).

    ``variant`` ``None``: a custom configuration; an unknown name is left for the builder to report.
    """
    options = dict(options or {})
    if variant is None or variant in VARIANTS:
        kernel_size = pretrained_kernel_size(variant, options.get("pretrained"), options.get("kernel_size"))
        if kernel_size is not None:
            options["kernel_size"] = kernel_size
    return options


def resolve(variant: str | None, pretrained: bool | str | os.PathLike) -> Path:
    """The checkpoint file that ``pretrained`` names for ``variant``: ``choose_pretrained``'s, downloaded if published.

    A tag takes precedence over a file of the same name in the working directory (write ``./in1k`` for the file).
    ``False`` and ``None`` name no file, so they are a ``CheckpointError`` here.
    """
    path = choose_pretrained(variant, pretrained).checkpoint()
    if path is None:
        raise _bad_value(pretrained)
    return path


def named_entry(variant: str | None, pretrained: bool | str | os.PathLike) -> PublishedWeights | None:
    """The published file that ``pretrained`` names for ``variant``, ``None`` for a path: ``choose_pretrained``'s
    look-up in the table.

    Decided from the table alone, without the network, so a model is never built for weights that do not
    exist: ``CheckpointError`` for a variant without published files, an unknown tag or a bad value.
    """
    if pretrained is True:
        return _published(variant)[DEFAULT_TAGS[variant]]
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise _bad_value(pretrained)
    if isinstance(pretrained, str):  # only a string can be a tag: a Path object always means a file
        tags = WEIGHTS.get(variant or "", {})
        if pretrained in tags:
            return tags[pretrained]
        if _looks_like_tag(pretrained):
            tags = _published(variant, asked=pretrained)  # raises if the variant has no published file at all
            downstream = [tag for tag, entry in tags.items() if entry.is_downstream]
            also = f"; the backbones of its COCO and ADE20K models: {', '.join(downstream)}" if downstream else ""
            raise CheckpointError(
                f"{variant} has no published weights tagged {pretrained!r} and there is no such file; "
                f"its tags: {', '.join(t for t in tags if t not in downstream)} (or give a checkpoint path){also}"
            )
    return None


def check_published(entry: PublishedWeights, path: str | os.PathLike | None = None) -> None:
    """``CheckpointError`` unless ``path`` (default: the cached file of ``entry``) is a readable checkpoint whose
    backbone fits ``entry``'s variant. Cheap: the model is built on the meta device and the tensors are mapped."""
    path = cache_path(entry) if path is None else Path(path)
    expected = _meta_state(get_variant(entry.variant), entry.kernel_size)
    check_backbone_state(expected, read_backbone(path, mmap=True), path)


@functools.lru_cache(maxsize=16)
def _meta_state(spec: VariantSpec, kernel_size: int) -> dict[str, torch.Tensor]:
    """The state dict (shapes only) of ``spec`` built on the meta device; kept, as ``revcol info`` checks many files."""
    with torch.device("meta"):
        return FullNet(**spec.fullnet_kwargs(kernel_size=kernel_size, save_memory=False)).state_dict()


def _bad_value(pretrained: object) -> CheckpointError:
    return CheckpointError(f"pretrained must be True, a published tag or a checkpoint path, got {pretrained!r}")


def _published(variant: str | None, asked: str | None = None) -> dict[str, PublishedWeights]:
    """The published files of ``variant``; ``CheckpointError`` when it has none (a custom configuration, RevCol-XL)."""
    which = "" if asked is None else f" (asked for {asked!r}, and there is no such file)"
    if variant is None:
        raise CheckpointError(
            f"no published weights exist for a custom RevCol configuration{which}; give a checkpoint path"
        )
    if variant not in WEIGHTS:
        raise CheckpointError(
            f"no published weights exist for {variant}{which}; variants with published weights: "
            f"{', '.join(WEIGHTS)}; give a checkpoint path"
        )
    return WEIGHTS[variant]


def _looks_like_tag(text: str) -> bool:
    """A bare word that is no existing file: no folder, no suffix, no ``~`` (a tag never has these)."""
    path_marks = {os.sep, os.altsep or os.sep, ".", "~"}
    return not text or (not any(mark in text for mark in path_marks) and not Path(text).exists())
