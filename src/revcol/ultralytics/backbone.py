"""RevCol in Ultralytics: the backbone layer, what Ultralytics' safe load may restore, the wrappers of its functions.

The YAML row that names a backbone is expanded by ``revcol.contract``; ``revcol.hooks`` installs the wrappers
below (``register()``). Nothing here patches anything by itself (``docs/design.md``, section "YAML contract")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from revcol.core.network import FullNet
from revcol.core.param_groups import check_lr_decay
from revcol.core.variants import get_variant
from revcol.errors import ConfigError
from revcol.ultralytics.yaml_rows import (
    CUSTOM_NAME,
    CUSTOM_OPTIONS,
    VARIANT_OPTIONS,
    custom_options_error,
    missing_custom_options,
)
from revcol.weights.pretrained import backbone_options, load_weights


class RevColBackbone(FullNet):
    """A RevCol backbone as an Ultralytics layer: ``RevColBackbone("revcol_small", {"pretrained": path})``.

    ``name`` is a variant of ``revcol.VARIANTS`` or ``"revcol"`` for a custom configuration given by
    ``channels``, ``layers`` and ``num_subnet`` in ``options``. Other options: ``pretrained`` (``true``, a
    published tag or a checkpoint path, see ``revcol.variants.load_weights``), ``save_memory``,
    ``drop_path``, ``kernel_size``. Returns the list ``[c0, c1, c2, c3]``.
    """

    def __init__(self, name: str = "revcol_small", options: Mapping[str, Any] | None = None) -> None:
        # what pretrained names is decided (and the kernel size it implies filled in) before anything is built
        options = backbone_options(None if name == CUSTOM_NAME else name, options)
        allowed = CUSTOM_OPTIONS if name == CUSTOM_NAME else VARIANT_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for RevCol backbone {name!r}; allowed: {sorted(allowed)}")
        pretrained = options.pop("pretrained", None)
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
        load_weights(self, None if name == CUSTOM_NAME else name, pretrained)
