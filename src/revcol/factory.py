"""One builder per variant of ``revcol.core.variants.VARIANTS``; each docstring is written from that table."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from revcol.core.network import FullNet, parameter_count
from revcol.core.variants import get_variant
from revcol.weights.pretrained import Pretrained, choose_pretrained, load_chosen

DEFAULT_KERNEL_SIZE: int = inspect.signature(FullNet).parameters["kernel_size"].default  # what a variant builds with


def build_variant(
    name: str,
    *,
    pretrained: Pretrained = None,
    save_memory: bool = True,
    drop_path: float | None = None,
    kernel_size: int | None = None,
) -> FullNet:
    """Build variant ``name``; ``drop_path=None`` uses the paper's rate; ``pretrained`` as in ``load_weights``.

    ``kernel_size=None``: ``FullNet``'s default, or what the published file that ``pretrained`` names was trained
    with.
    """
    spec = get_variant(name)
    choice = choose_pretrained(name, pretrained, kernel_size)  # before building: no model for weights that don't exist
    model = FullNet(**spec.fullnet_kwargs(drop_path=drop_path, kernel_size=choice.kernel_size, save_memory=save_memory))
    load_chosen(model, choice)
    return model


def variant_summary(name: str) -> str:
    """One line on variant ``name``: channels, depths, columns, drop-path rate, wiring and backbone parameters."""
    spec = get_variant(name)
    config = (spec.channels, spec.layers, spec.num_subnet, DEFAULT_KERNEL_SIZE, spec.level0_from_coarsest)
    params = parameter_count(*config)
    wiring = ", level 0 also reads level 3" if spec.level0_from_coarsest else ""
    return (
        f"channels {'-'.join(map(str, spec.channels))}, depths {'-'.join(map(str, spec.layers))}, "
        f"{spec.num_subnet} columns, drop path {spec.drop_path:g}{wiring}; {params / 1e6:.1f} M parameters"
    )


def _builder(name: str) -> Callable[..., FullNet]:
    """The public builder of variant ``name``: a real function, named after it, documented from the table."""

    def builder(**kwargs: Any) -> FullNet:
        return build_variant(name, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = __name__
    builder.__doc__ = f"RevCol ``{name}``: {variant_summary(name)}.\n\nKeywords as ``build_variant``."
    return builder


# Spelled out, not looped into globals(), so that imports, pickles and type checkers see each name.
revcol_tiny = _builder("revcol_tiny")
revcol_small = _builder("revcol_small")
revcol_base = _builder("revcol_base")
revcol_large = _builder("revcol_large")
revcol_xlarge = _builder("revcol_xlarge")
revcol_huge = _builder("revcol_huge")
