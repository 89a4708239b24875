"""The six ImageNet configurations of the paper (``docs/design.md``, section "Variants"), declared as data."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from revcol import weights
from revcol.errors import ConfigError
from revcol.model import FullNet
from revcol.pretrained import check_backbone_state, load_pretrained, read_backbone


@dataclass(frozen=True)
class VariantSpec:
    """Channels and depths per level, number of columns, default drop-path rate and wiring of a variant."""

    channels: tuple[int, int, int, int]
    layers: tuple[int, int, int, int]
    num_subnet: int
    drop_path: float
    level0_from_coarsest: bool = False  # RevCol-H's extra level-3 -> level-0 branch (FullNet's option)

    def fullnet_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``FullNet`` keyword arguments of this variant; ``overrides`` (``None`` values ignored) take precedence."""
        return {**asdict(self), **{k: v for k, v in overrides.items() if v is not None}}


VARIANTS: dict[str, VariantSpec] = {
    "revcol_tiny": VariantSpec((64, 128, 256, 512), (2, 2, 4, 2), 4, 0.1),
    "revcol_small": VariantSpec((64, 128, 256, 512), (2, 2, 4, 2), 8, 0.3),
    "revcol_base": VariantSpec((72, 144, 288, 576), (1, 1, 3, 2), 16, 0.4),
    "revcol_large": VariantSpec((128, 256, 512, 1024), (1, 2, 6, 2), 8, 0.5),
    "revcol_xlarge": VariantSpec((224, 448, 896, 1792), (1, 2, 6, 2), 8, 0.5),
    "revcol_huge": VariantSpec((360, 720, 1440, 2880), (1, 2, 6, 2), 8, 0.5, level0_from_coarsest=True),
}


def get_variant(name: str) -> VariantSpec:
    """The spec of variant ``name``; ``ConfigError`` listing the known names otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown RevCol variant {name!r}; known variants: {', '.join(VARIANTS)}") from None


Pretrained = bool | str | os.PathLike | None


def load_weights(model: FullNet, variant: str | None, pretrained: Pretrained) -> None:
    """Load what ``pretrained`` names into ``model`` (variant ``variant``, ``None`` for a custom configuration).

    ``True``: the variant's default published weights; one of its tags (``revcol.weights.WEIGHTS``): those;
    anything else: a checkpoint path. Published files are downloaded once into torch's hub cache.
    ``None`` or ``False``: nothing is loaded.
    """
    if pretrained is not None and pretrained is not False:
        load_pretrained(model, weights.resolve(variant, pretrained))


def pretrained_kernel_size(variant: str | None, pretrained: Pretrained, kernel_size: int | None) -> int | None:
    """The ``kernel_size`` to build ``variant`` with for ``pretrained``, checked before anything is built.

    A published file fixes it (RevCol-H's ``megdata_k7`` and its UperNet file: 7); ``kernel_size`` may then
    only repeat it. Raises ``CheckpointError`` when ``pretrained`` names published weights that do not exist
    (RevCol-XL, a custom configuration, an unknown tag), without the network. ``None``: the default (3).
    """
    entry = None if pretrained is None or pretrained is False else weights.named_entry(variant, pretrained)
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


def build_variant(
    name: str,
    *,
    pretrained: Pretrained = None,
    save_memory: bool = True,
    drop_path: float | None = None,
    kernel_size: int | None = None,
) -> FullNet:
    """Build variant ``name``; ``drop_path=None`` uses the paper's rate; ``pretrained`` as in ``load_weights``.

    ``kernel_size=None``: 3, or what the published file that ``pretrained`` names was trained with.
    """
    spec = get_variant(name)
    kernel_size = pretrained_kernel_size(name, pretrained, kernel_size)  # before building: no model for nothing
    model = FullNet(**spec.fullnet_kwargs(drop_path=drop_path, kernel_size=kernel_size, save_memory=save_memory))
    load_weights(model, name, pretrained)
    return model


def check_published(entry: weights.PublishedWeights, path: str | os.PathLike | None = None) -> None:
    """``CheckpointError`` unless ``path`` (default: the cached file of ``entry``) is a readable checkpoint whose
    backbone fits ``entry``'s variant. Cheap: the model is built on the meta device and the tensors are mapped."""
    path = weights.cache_path(entry) if path is None else Path(path)
    expected = _meta_state(get_variant(entry.variant), entry.kernel_size)
    check_backbone_state(expected, read_backbone(path, mmap=True), path)


@functools.lru_cache(maxsize=16)
def _meta_state(spec: VariantSpec, kernel_size: int) -> dict[str, torch.Tensor]:
    """The state dict (shapes only) of ``spec`` built on the meta device; kept, as ``revcol info`` checks many files."""
    with torch.device("meta"):
        return FullNet(**spec.fullnet_kwargs(kernel_size=kernel_size, save_memory=False)).state_dict()


def revcol_tiny(**kwargs) -> FullNet:
    """RevCol-T: C 64-512, D 2-2-4-2, 4 columns (29.9 M params). Keywords as ``build_variant``."""
    return build_variant("revcol_tiny", **kwargs)


def revcol_small(**kwargs) -> FullNet:
    """RevCol-S: C 64-512, D 2-2-4-2, 8 columns (60.1 M params). Keywords as ``build_variant``."""
    return build_variant("revcol_small", **kwargs)


def revcol_base(**kwargs) -> FullNet:
    """RevCol-B: C 72-576, D 1-1-3-2, 16 columns (138.0 M params). Keywords as ``build_variant``."""
    return build_variant("revcol_base", **kwargs)


def revcol_large(**kwargs) -> FullNet:
    """RevCol-L: C 128-1024, D 1-2-6-2, 8 columns (272.1 M params). Keywords as ``build_variant``."""
    return build_variant("revcol_large", **kwargs)


def revcol_xlarge(**kwargs) -> FullNet:
    """RevCol-XL: C 224-1792, D 1-2-6-2, 8 columns (832.0 M params). Keywords as ``build_variant``."""
    return build_variant("revcol_xlarge", **kwargs)


def revcol_huge(**kwargs) -> FullNet:
    """RevCol-H: C 360-2880, D 1-2-6-2, 8 columns, level 0 also reads level 3 (2154.7 M params).

    Keywords as ``build_variant``.
    """
    return build_variant("revcol_huge", **kwargs)
