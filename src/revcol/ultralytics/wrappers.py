"""RevCol in Ultralytics: the backbone layer, what Ultralytics' safe load may restore, the wrappers of its functions.

The YAML row that names a backbone is expanded by ``revcol.ultralytics.yaml_rows``; ``revcol.ultralytics.hooks``
installs the wrappers below (``register()``). Nothing here patches anything by itself (``docs/design.md``, section
"YAML contract")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.releases import check_heads
from revcol.ultralytics.yaml_rows import (
    BACKBONE_LAYERS,
    CONFIG_DIR,
    expand_backbone,
    names_revcol_backbone,
)


def wrap_parse_model(parse_model: Callable) -> Callable:
    """``parse_model`` on the expanded model dict (``yaml_rows.expand_backbone``)."""

    @functools.wraps(parse_model)
    def wrapper(d, ch, verbose=True):
        if names_revcol_backbone(d):
            check_heads(d)
        return parse_model(expand_backbone(d), ch, verbose)

    return wrapper


def wrap_check_yaml(check_yaml: Callable) -> Callable:
    """``check_yaml`` that finds the shipped configs by bare name (when no such file is in the working folder)."""

    @functools.wraps(check_yaml)
    def wrapper(file, *args, **kwargs):
        shipped = CONFIG_DIR / str(file)
        if str(file) == Path(file).name and not Path(file).exists() and shipped.is_file():
            return str(shipped)
        return check_yaml(file, *args, **kwargs)

    return wrapper


def wrap_predict(predict: Callable) -> Callable:
    """Embedding a RevCol backbone layer (its output is a list) means embedding its four levels."""

    @functools.wraps(predict)
    def wrapper(self, x, *args, embed=None, **kwargs):
        if embed:
            backbones = {i for i, m in enumerate(self.model) if isinstance(m, RevColBackbone)}
            embed = sorted({j for i in embed for j in (range(i + 1, i + BACKBONE_LAYERS) if i in backbones else [i])})
        return predict(self, x, *args, embed=embed, **kwargs)

    return wrapper
