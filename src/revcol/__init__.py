"""RevCol (Reversible Column Networks) backbones for PyTorch and Ultralytics.

``import revcol`` also registers the backbones with Ultralytics (see ``revcol.register``) and the variants as
timm models (``revcol.timm_models``; no network access).
How the pieces fit together: ``docs/design.md`` in the repository.
"""

import importlib.metadata
import warnings

from revcol import _legacy
from revcol.checkpoints import LoadResult, load_pretrained, save_backbone
from revcol.core.blocks import ConvNextBlock, Fusion, UpSample
from revcol.core.network import FullNet, Level, SubNet
from revcol.core.reversible import ReverseFunction
from revcol.core.variants import VARIANTS, VariantSpec
from revcol.errors import CheckpointError, ConfigError, InputError, RevColError
from revcol.factory import (
    build_variant,
    revcol_base,
    revcol_huge,
    revcol_large,
    revcol_small,
    revcol_tiny,
    revcol_xlarge,
)
from revcol.timm_models import RevColClassifier, load_classifier_weights
from revcol.weights import load_weights

try:
    __version__ = importlib.metadata.version("revcol")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.hooks import is_registered, register, unregister

_legacy.install()

try:
    register()
except RuntimeError as error:  # unsupported Ultralytics: the torch API still works
    warnings.warn(str(error), RuntimeWarning, stacklevel=2)

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConfigError",
    "ConvNextBlock",
    "FullNet",
    "Fusion",
    "InputError",
    "Level",
    "LoadResult",
    "RevColBackbone",
    "RevColClassifier",
    "RevColError",
    "ReverseFunction",
    "SubNet",
    "UpSample",
    "VariantSpec",
    "build_variant",
    "is_registered",
    "load_classifier_weights",
    "load_pretrained",
    "load_weights",
    "register",
    "revcol_base",
    "revcol_huge",
    "revcol_large",
    "revcol_small",
    "revcol_tiny",
    "revcol_xlarge",
    "save_backbone",
    "unregister",
]
