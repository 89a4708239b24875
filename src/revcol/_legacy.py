"""Module paths of earlier releases, kept importable: checkpoints pickle class paths, and user code imports them.

Each old module becomes an alias whose attributes are looked up, in order, in the modules that now hold them.
Aliases are silent: an old Ultralytics ``.pt`` is loaded for as long as it exists, and a warning on every load
would be noise its owner cannot act on (``docs/design.md``, section "Module map").
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "revcol.model": ("revcol.core.blocks", "revcol.core.network"),
    "revcol.reversible": ("revcol.core.reversible",),
    "revcol.variants": ("revcol.core.variants", "revcol.factory", "revcol.weights.pretrained"),
    "revcol.lr_decay": ("revcol.core.param_groups",),
    "revcol.pretrained": ("revcol.checkpoints.backbone", "revcol.checkpoints.files"),
    "revcol.integration": (
        "revcol.ultralytics.backbone",
        "revcol.ultralytics.safe_load",
        "revcol.ultralytics.releases",
        "revcol.ultralytics.yaml_rows",
    ),
    "revcol.contract": ("revcol.ultralytics.yaml_rows",),
    "revcol.hooks": ("revcol.ultralytics.hooks",),
    "revcol.trainers": ("revcol.ultralytics.trainers",),
}


class _Alias(types.ModuleType):
    """An old module path: its attributes are those of the modules in ``MOVED`` that hold them now."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved: see {', '.join(targets)}.")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        moved = ", ".join(self._targets)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r} (its names moved to {moved})")

    def __dir__(self) -> list[str]:
        return sorted({name for target in self._targets for name in dir(importlib.import_module(target))})


def old_names(cls: type) -> list[str]:
    """The dotted names under which earlier releases pickled ``cls``."""
    return [f"{old}.{cls.__qualname__}" for old, targets in MOVED.items() if cls.__module__ in targets]


def install() -> None:
    """Make every old path importable (idempotent); called by ``import revcol``."""
    for old, targets in MOVED.items():
        if old not in sys.modules:
            sys.modules[old] = _Alias(old, targets)
