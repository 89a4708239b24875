"""The six ImageNet configurations of the paper (``docs/design.md``, section "Variants"), declared as data."""

from __future__ import annotations

import os
from pathlib import Path

import torch.hub

from revcol.checkpoints.backbone import read_backbone
from revcol.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which is all the sweep needs
    fcntl = None
import functools
from collections.abc import Mapping
from typing import Any

import torch

from revcol.checkpoints.backbone import check_backbone_state, load_pretrained
from revcol.core.network import FullNet
from revcol.core.variants import VARIANTS, VariantSpec, get_variant
from revcol.errors import ConfigError
from revcol.weights.cache import cache_path, download
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

Pretrained = bool | str | os.PathLike | None


def load_weights(model: FullNet, variant: str | None, pretrained: Pretrained) -> None:
    """Load what ``pretrained`` names into ``model`` (variant ``variant``, ``None`` for a custom configuration).

    ``True``: the variant's default published weights; one of its tags (``revcol.weights.WEIGHTS``): those;
    anything else: a checkpoint path. Published files are downloaded once into torch's hub cache.
    ``None`` or ``False``: nothing is loaded.
    """
    if pretrained is not None and pretrained is not False:
        load_pretrained(model, resolve(variant, pretrained))


def pretrained_kernel_size(variant: str | None, pretrained: Pretrained, kernel_size: int | None) -> int | None:
    """The ``kernel_size`` to build ``variant`` with for ``pretrained``, checked before anything is built.

    A published file fixes it (RevCol-H's ``megdata_k7`` and its UperNet file: 7); ``kernel_size`` may then
    only repeat it. Raises ``CheckpointError`` when ``pretrained`` names published weights that do not exist
    (RevCol-XL, a custom configuration, an unknown tag), without the network. ``None``: the default (3).
    """
    entry = None if pretrained is None or pretrained is False else named_entry(variant, pretrained)
    if entry is None:
        return kernel_size
    if kernel_size is not None and kernel_size != entry.kernel_size:
        raise ConfigError(
            f"{variant} weights {entry.tag!r} ({entry.filename}) have {entry.kernel_size}x{entry.kernel_size} "
            f"depthwise kernels, so kernel_size must be {entry.kernel_size} (or left out), got {kernel_size!r}"
        )
    return entry.kernel_size


def backbone_options(variant: str | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model-YAML row's options with what its ``pretrained`` implies filled in (``pretrained_kernel_size``).

    ``variant`` ``None``: a custom configuration. Called before the backbone is built.
    """
    options = dict(options or {})
    if variant is not None and variant not in VARIANTS:
        return options  # an unknown name is reported by the builder, with the list of known ones
    kernel_size = pretrained_kernel_size(variant, options.get("pretrained"), options.get("kernel_size"))
    if kernel_size is not None:
        options["kernel_size"] = kernel_size
    return options


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


def resolve(variant: str | None, pretrained: bool | str | os.PathLike) -> Path:
    """The checkpoint file that ``pretrained`` names for ``variant`` (``None``: a custom configuration).

    ``True``: the variant's default published weights (``DEFAULT_TAGS``); one of its tags (``WEIGHTS``):
    that file. Both are downloaded once into torch's hub cache. Anything else is a local path (``~``
    expanded); whether it exists is checked when it is read. A tag takes precedence over a file of the
    same name in the working directory (write ``./in1k`` for the file). ``False`` and ``None`` mean "load
    nothing" and are the caller's to skip.
    """
    entry = named_entry(variant, pretrained)
    return download(entry) if entry is not None else Path(pretrained).expanduser()


def named_entry(variant: str | None, pretrained: bool | str | os.PathLike) -> PublishedWeights | None:
    """The published file that ``pretrained`` names for ``variant`` (as ``resolve``), ``None`` for a path.

    Decided from the table alone, without the network, so a model is never built for weights that do not
    exist: ``CheckpointError`` for a variant without published files, an unknown tag or a bad value.
    """
    if pretrained is True:
        return _published(variant)[DEFAULT_TAGS[variant]]
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise CheckpointError(f"pretrained must be True, a published tag or a checkpoint path, got {pretrained!r}")
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
