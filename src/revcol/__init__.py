"""RevCol (Reversible Column Networks) backbones for PyTorch and Ultralytics.

``import revcol`` makes the backbones nameable in Ultralytics YAMLs (see ``revcol.register``) and the variants timm
models (``revcol.timm_models``; no network access). It imports neither library, nor torch: the names below load on
first use, and the registrations run once Ultralytics or timm is imported, or at once if it already is
(``revcol._after_import``), so that ``import revcol`` and the ``revcol`` command start in a fraction of a second.
How the pieces fit together: ``docs/design.md`` in the repository.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import TYPE_CHECKING, Any

from revcol import _after_import, _legacy
from revcol.errors import CheckpointError, ConfigError, InputError, RevColError
from revcol.ultralytics.hooks import is_registered, register, unregister

if TYPE_CHECKING:  # what LAZY loads, for type checkers (tests/test_layout.py keeps the two the same)
    from revcol.checkpoints import (
        LoadResult,
        load_pretrained,
        save_backbone,
    )
    from revcol.core.blocks import ConvNextBlock, Fusion, UpSample
    from revcol.core.network import FullNet, Level, SubNet
    from revcol.core.reversible import ReverseFunction
    from revcol.core.variants import VARIANTS, VariantSpec
    from revcol.factory import (
        build_variant,
        revcol_base,
        revcol_huge,
        revcol_large,
        revcol_small,
        revcol_tiny,
        revcol_xlarge,
    )
    from revcol.timm_models import (
        RevColClassifier,
        load_classifier_weights,
    )
    from revcol.ultralytics.backbone import RevColBackbone
    from revcol.weights import load_weights

# Public names that need torch, by the module that holds them: loaded on first use.
LAZY: dict[str, tuple[str, ...]] = {
    "revcol.checkpoints": ("LoadResult", "load_pretrained", "save_backbone"),
    "revcol.core.blocks": ("ConvNextBlock", "Fusion", "UpSample"),
    "revcol.core.network": ("FullNet", "Level", "SubNet"),
    "revcol.core.reversible": ("ReverseFunction",),
    "revcol.core.variants": ("VARIANTS", "VariantSpec"),
    "revcol.factory": (
        "build_variant",
        "revcol_base",
        "revcol_huge",
        "revcol_large",
        "revcol_small",
        "revcol_tiny",
        "revcol_xlarge",
    ),
    "revcol.timm_models": ("RevColClassifier", "load_classifier_weights"),
    "revcol.ultralytics.backbone": ("RevColBackbone",),
    "revcol.weights": ("load_weights",),
}
_HOME = {name: module for module, names in LAZY.items() for name in names}

try:
    __version__ = importlib.metadata.version("revcol")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'revcol' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


def _register_with_ultralytics() -> None:
    try:
        register()
    except RuntimeError as error:  # unsupported Ultralytics: the torch API still works
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)


def _register_with_timm() -> None:
    importlib.import_module("revcol.timm_models")  # its entrypoints register themselves


_legacy.install()
_after_import.when_imported("ultralytics", _register_with_ultralytics)
_after_import.when_imported("timm", _register_with_timm)

__all__ = sorted(
    [
        *_HOME,
        "CheckpointError",
        "ConfigError",
        "InputError",
        "RevColError",
        "is_registered",
        "register",
        "unregister",
    ]
)
