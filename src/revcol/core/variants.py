"""The six ImageNet configurations of the paper (``docs/design.md``, section "Variants"), declared as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from revcol.errors import ConfigError


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
