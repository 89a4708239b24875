"""``RevColBackbone``: the Ultralytics layer that a model-YAML RevCol row becomes (``revcol.ultralytics.yaml_rows``
expands the row; ``docs/design.md``, section "YAML contract")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from revcol.core.network import FullNet
from revcol.core.param_groups import check_lr_decay
from revcol.core.variants import VARIANTS, get_variant
from revcol.errors import ConfigError
from revcol.ultralytics.yaml_rows import (
    CUSTOM_NAME,
    CUSTOM_OPTIONS,
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
