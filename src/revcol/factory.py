"""The six ImageNet configurations of the paper (``docs/design.md``, section "Variants"), declared as data."""

from __future__ import annotations

from revcol.core.network import FullNet
from revcol.core.variants import get_variant
from revcol.weights.pretrained import Pretrained, load_weights, pretrained_kernel_size


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
