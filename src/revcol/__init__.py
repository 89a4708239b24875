"""RevCol (Reversible Column Networks) backbones for PyTorch and Ultralytics.

``import revcol`` also registers the backbones with Ultralytics (see ``revcol.register``).
"""

import warnings

from revcol.model import ConvNextBlock, FullNet, Fusion, Level, SubNet, UpSample
from revcol.pretrained import CheckpointError, LoadResult, load_pretrained
from revcol.reversible import ReverseFunction
from revcol.variants import (
    VARIANTS,
    VariantSpec,
    build_variant,
    revcol_base,
    revcol_large,
    revcol_small,
    revcol_tiny,
    revcol_xlarge,
)

__version__ = "0.1.0"

from revcol.integration import RevColBackbone, is_registered, register, unregister

try:
    register()
except RuntimeError as error:  # unsupported Ultralytics: the torch API still works
    warnings.warn(str(error), RuntimeWarning, stacklevel=2)

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConvNextBlock",
    "FullNet",
    "Fusion",
    "Level",
    "LoadResult",
    "RevColBackbone",
    "ReverseFunction",
    "SubNet",
    "UpSample",
    "VariantSpec",
    "build_variant",
    "is_registered",
    "load_pretrained",
    "register",
    "revcol_base",
    "revcol_large",
    "revcol_small",
    "revcol_tiny",
    "revcol_xlarge",
    "unregister",
]
