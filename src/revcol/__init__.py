"""RevCol (Reversible Column Networks) backbones for PyTorch and Ultralytics.

``import revcol`` also registers the backbones with Ultralytics (see ``revcol.register``) and the variants as
timm models (``revcol.timm_models``; no network access).
How the pieces fit together: ``docs/design.md`` in the repository.
"""

import importlib.metadata
import warnings

from revcol.errors import CheckpointError, ConfigError, InputError, RevColError
from revcol.model import ConvNextBlock, FullNet, Fusion, Level, SubNet, UpSample
from revcol.pretrained import LoadResult, load_pretrained, save_backbone
from revcol.reversible import ReverseFunction
from revcol.timm_models import RevColClassifier, load_classifier_weights
from revcol.variants import (
    VARIANTS,
    VariantSpec,
    build_variant,
    load_weights,
    revcol_base,
    revcol_huge,
    revcol_large,
    revcol_small,
    revcol_tiny,
    revcol_xlarge,
)

try:
    __version__ = importlib.metadata.version("revcol")
except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from revcol.hooks import is_registered, register, unregister
from revcol.integration import RevColBackbone

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
