"""``RevColBackbone``: the Ultralytics layer that a model-YAML RevCol row becomes (``revcol.ultralytics.yaml_rows``
expands the row; ``docs/design.md``, section "YAML contract")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from revcol.core.network import FullNet, check_input
from revcol.core.param_groups import check_lr_decay
from revcol.core.variants import VARIANTS, get_variant
from revcol.errors import ConfigError, InputError
from revcol.ultralytics.yaml_rows import (
    CUSTOM_NAME,
    CUSTOM_OPTIONS,
    LEVEL_STRIDES,
    VARIANT_OPTIONS,
    custom_options_error,
    missing_custom_options,
)
from revcol.weights.pretrained import PretrainedChoice, choose_pretrained, load_chosen


class RevColBackbone(FullNet):
    """A RevCol backbone as an Ultralytics layer: ``RevColBackbone("revcol_small", {"pretrained": path})``.

    ``name`` is a variant of ``revcol.VARIANTS`` or ``"revcol"`` for a custom configuration given by
    ``channels``, ``layers`` and ``num_subnet`` in ``options``. Other options: ``pretrained`` (``true``, a
    published tag or a checkpoint path, as ``revcol.load_weights``), ``save_memory``, ``drop_path``,
    ``kernel_size``, ``lr_decay``. Returns the list ``[c0, c1, c2, c3]``.
    """

    def __init__(self, name: str = "revcol_small", options: Mapping[str, Any] | None = None) -> None:
        variant = None if name == CUSTOM_NAME else name
        options = dict(options or {})
        choice = PretrainedChoice()
        if variant is None or variant in VARIANTS:  # an unknown name is reported by get_variant, with the known ones
            # what pretrained names, and the kernel size it implies, is decided before anything is built
            choice = choose_pretrained(variant, options.get("pretrained"), options.get("kernel_size"))
            if choice.kernel_size is not None:
                options["kernel_size"] = choice.kernel_size
        allowed = CUSTOM_OPTIONS if name == CUSTOM_NAME else VARIANT_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for RevCol backbone {name!r}; allowed: {sorted(allowed)}")
        options.pop("pretrained", None)
        lr_decay = check_lr_decay(options.pop("lr_decay", None))  # read by the RevCol trainers
        if name == CUSTOM_NAME:
            missing = missing_custom_options(options)
            if missing:
                raise custom_options_error(missing)
            config = {"drop_path": 0.0, **options}
        else:
            config = get_variant(name).fullnet_kwargs(**options)
        super().__init__(**config)
        self.variant = name
        self.lr_decay = lr_decay
        load_chosen(self, choice)

    def check_input(self, x: torch.Tensor) -> None:
        """``FullNet``'s checks, and H, W positive multiples of the coarsest stride: Ultralytics' heads concatenate
        up-sampled maps, which only line up at such sizes (its ``predict`` and ``val`` letterbox to them)."""
        stride = LEVEL_STRIDES[-1]
        if isinstance(x, torch.Tensor) and x.dim() == 4:  # anything else gets FullNet's message
            height, width = x.shape[-2:]
            if height % stride or width % stride or not height or not width:
                raise InputError(
                    f"RevCol in an Ultralytics model needs H and W to be positive multiples of {stride} (its head "
                    f"joins up-sampled maps of strides up to {stride}), got {height}x{width}"
                )
        check_input(x)
