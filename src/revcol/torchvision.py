"""RevCol as a torchvision detection backbone: ``revcol_fpn_backbone``, shaped like torchvision's
``resnet_fpn_backbone``.

The module it builds (``RevColFPN``) runs a RevCol (``FullNet``) and torchvision's own ``FeaturePyramidNetwork`` on
the maps the last column returns; its ``out_channels`` and the ``OrderedDict`` of maps it returns are what
torchvision's ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` and ``FCOS`` take. torchvision is an optional dependency
(``pip install "revcol[torchvision]"``): it is imported when a backbone is built, never by ``import revcol``.
"""

from __future__ import annotations

import itertools
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from revcol.core.network import FullNet
from revcol.core.variants import VARIANTS, VariantSpec, get_variant
from revcol.errors import ConfigError
from revcol.factory import build_variant
from revcol.weights.pretrained import Pretrained, choose_pretrained, load_chosen

if TYPE_CHECKING:
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = ["RevColFPN", "revcol_fpn_backbone"]

# torchvision's numbering of a backbone's stages (resnet_fpn_backbone's returned_layers): layer1 is RevCol's level 0
# (stride 4), layer4 its level 3 (stride 32).
LAYERS = (1, 2, 3, 4)
CUSTOM_KEYS = ("channels", "layers", "num_subnet")
CUSTOM_OPTIONAL_KEYS = ("level0_from_coarsest",)
INSTALL_HINT = 'pip install "revcol[torchvision]"'


def _fpn_module() -> ModuleType:
    """torchvision's FPN module; an ``ImportError`` naming the extra to install when torchvision is missing."""
    try:
        from torchvision.ops import feature_pyramid_network
    except ImportError as error:
        raise ImportError(
            f"revcol.torchvision needs torchvision, which could not be imported ({error}); install it with "
            f"{INSTALL_HINT}"
        ) from error
    return feature_pyramid_network


def _check_fpn_options(
    extra_blocks: ExtraFPNBlock | None, norm_layer: Callable[..., nn.Module] | None, out_channels: int
) -> ModuleType:
    """torchvision's FPN module (``_fpn_module``), once the FPN's options are checked: ``ConfigError`` for a bad one."""
    fpn = _fpn_module()
    if not _is_int(out_channels) or out_channels < 1:
        raise ConfigError(f"out_channels must be a positive int (torchvision uses 256), got {out_channels!r}")
    if extra_blocks is not None and not isinstance(extra_blocks, fpn.ExtraFPNBlock):
        raise ConfigError(
            "extra_blocks must be a torchvision ExtraFPNBlock (LastLevelMaxPool(), LastLevelP6P7(...)) or None "
            f"(LastLevelMaxPool), got {type(extra_blocks).__name__}"
        )
    if norm_layer is not None and not callable(norm_layer):
        raise ConfigError(
            f"norm_layer must be None or a callable that makes a norm module (nn.BatchNorm2d), got {norm_layer!r}"
        )
    return fpn


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_returned_layers(returned_layers: Sequence[int] | None) -> tuple[int, ...]:
    """``returned_layers`` as a tuple (``None``: all four); ``ConfigError`` unless distinct ints of 1-4, increasing.

    The FPN adds each coarser map into the next finer one, so the order is fixed: finest first.
    """
    if returned_layers is None:
        return LAYERS
    if (
        isinstance(returned_layers, (str, bytes))
        or not isinstance(returned_layers, Sequence)
        or not returned_layers
        or not all(_is_int(layer) and layer in LAYERS for layer in returned_layers)
        or any(a >= b for a, b in itertools.pairwise(returned_layers))
    ):
        raise ConfigError(
            "returned_layers must be distinct ints from 1 (RevCol level 0, stride 4) to 4 (level 3, stride 32) in "
            f"increasing order, as torchvision's resnet_fpn_backbone takes them (e.g. [2, 3, 4]), "
            f"got {returned_layers!r}"
        )
    return tuple(int(layer) for layer in returned_layers)


def _check_trainable_columns(trainable_columns: int | None, num_subnet: int) -> int:
    """The number of columns that train (``None``: all ``num_subnet``); ``ConfigError`` outside 0..num_subnet."""
    if trainable_columns is None:
        return num_subnet
    if not _is_int(trainable_columns) or not 0 <= trainable_columns <= num_subnet:
        raise ConfigError(
            f"trainable_columns must be an int from 0 (backbone frozen) to {num_subnet} (this RevCol's number of "
            f"columns: all train) or None (all), got {trainable_columns!r}"
        )
    return int(trainable_columns)


class RevColFPN(nn.Module):
    """A RevCol backbone (``body``) with torchvision's ``FeaturePyramidNetwork`` (``fpn``) on its maps.

    ``forward(images)`` returns an ``OrderedDict`` of ``out_channels``-channel maps, finest first, keyed as
    torchvision's ``BackboneWithFPN`` keys them: ``"0"``, ``"1"``, ... for the ``returned_layers``, then the extra
    block's (``"pool"`` for ``LastLevelMaxPool``, ``"p6"`` and ``"p7"`` for ``LastLevelP6P7``). Any input of at least
    32x32 pixels works; each map has the floored size (H // 4, then halved and floored per level).

    Args:
        body: the RevCol backbone; its first ``num_subnet - trainable_columns`` columns and, unless all columns
            train, its stem get ``requires_grad=False`` and stay in eval mode (no drop-path): a fixed function.
        returned_layers, trainable_columns, extra_blocks, norm_layer, out_channels: as ``revcol_fpn_backbone``.

    Examples:
        >>> fpn = RevColFPN(revcol.FullNet((8, 16, 24, 32), (1, 1, 1, 1), 2), out_channels=32)
        >>> [tuple(m.shape) for m in fpn(torch.randn(1, 3, 64, 96)).values()]
        [(1, 32, 16, 24), (1, 32, 8, 12), (1, 32, 4, 6), (1, 32, 2, 3), (1, 32, 1, 2)]
    """

    def __init__(
        self,
        body: FullNet,
        returned_layers: Sequence[int] | None = None,
        trainable_columns: int | None = None,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        out_channels: int = 256,
    ) -> None:
        fpn = _check_fpn_options(extra_blocks, norm_layer, out_channels)
        if not isinstance(body, FullNet):
            raise ConfigError(f"RevColFPN wraps a RevCol backbone (revcol.FullNet), got {type(body).__name__}")
        super().__init__()
        self.returned_layers = _check_returned_layers(returned_layers)
        self.trainable_columns = _check_trainable_columns(trainable_columns, body.num_subnet)
        self.out_channels = int(out_channels)
        self.body = body
        self.fpn = fpn.FeaturePyramidNetwork(
            [body.channels[layer - 1] for layer in self.returned_layers],
            self.out_channels,
            extra_blocks=fpn.LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(body.training)

    def frozen_modules(self) -> list[nn.Module]:
        """The parts of ``body`` that do not train: the stem and the first columns, unless every column trains."""
        frozen = self.body.num_subnet - self.trainable_columns
        return [self.body.stem, *self.body.subnets[:frozen]] if frozen else []

    def train(self, mode: bool = True) -> RevColFPN:
        """``nn.Module.train``, except that the frozen parts stay in eval mode (as torchvision's frozen batch norms)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.train(False)
        return self

    @property
    def save_memory(self) -> bool:
        """Whether training runs the body's reversible backward (its ``save_memory``); may be switched any time."""
        return self.body.save_memory

    @save_memory.setter
    def save_memory(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"save_memory must be True or False, got {value!r}")
        self.body.save_memory = value

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        picked = OrderedDict((str(index), features[layer - 1]) for index, layer in enumerate(self.returned_layers))
        return self.fpn(picked)


def revcol_fpn_backbone(
    name: str | Mapping[str, Any],
    pretrained: Pretrained = False,
    *,
    returned_layers: Sequence[int] | None = None,
    trainable_columns: int | None = None,
    save_memory: bool = True,
    extra_blocks: ExtraFPNBlock | None = None,
    norm_layer: Callable[..., nn.Module] | None = None,
    out_channels: int = 256,
    drop_path: float | None = None,
    kernel_size: int | None = None,
) -> RevColFPN:
    """A RevCol backbone with a feature pyramid, for torchvision's FasterRCNN, MaskRCNN, RetinaNet and FCOS.

    Args:
        name: a variant (``"revcol_tiny"`` ... ``"revcol_huge"``), or a custom configuration: a mapping with
            ``channels``, ``layers`` and ``num_subnet`` (and optionally ``level0_from_coarsest``), as ``FullNet``.
        pretrained: as everywhere in revcol: ``True`` (the variant's default ImageNet weights), a published tag
            (``"in1k_ft_coco"``: the backbone of the authors' Cascade Mask R-CNN) or a checkpoint path; the backbone
            only is loaded (the FPN starts fresh).
        returned_layers: the levels the FPN reads, numbered as torchvision's: 1 (stride 4) to 4 (stride 32),
            increasing; default all four. RetinaNet and FCOS read ``[2, 3, 4]`` with ``LastLevelP6P7``.
        trainable_columns: how many columns train, counted from the last (torchvision's ``trainable_layers``);
            the stem trains only when all do. ``None`` (default): everything trains; ``0``: the backbone is frozen.
        save_memory: train through the reversible backward (keeps no level activations; same gradients).
        extra_blocks: torchvision's ``ExtraFPNBlock`` after the pyramid; default ``LastLevelMaxPool()``.
        norm_layer: torchvision's FPN ``norm_layer`` (default: none).
        out_channels: channels of every FPN map (default 256).
        drop_path: stochastic depth rate; ``None``: the variant's (the paper's), 0 for a custom configuration.
        kernel_size: depthwise kernel size; ``None``: the default, or what the ``pretrained`` file needs.

    Returns:
        A ``RevColFPN``: ``out_channels`` and an ``OrderedDict`` of maps, ready for a torchvision detector.

    Examples:
        >>> from torchvision.models.detection import MaskRCNN
        >>> backbone = revcol_fpn_backbone("revcol_tiny", pretrained="in1k_ft_coco")
        >>> model = MaskRCNN(backbone, num_classes=91)
    """
    # every option is checked (and a missing torchvision reported) before anything is built or downloaded
    fpn_options = {"extra_blocks": extra_blocks, "norm_layer": norm_layer, "out_channels": out_channels}
    _check_fpn_options(**fpn_options)
    spec = _spec(name)
    layers = _check_returned_layers(returned_layers)
    _check_trainable_columns(trainable_columns, spec.num_subnet)
    if isinstance(name, str):
        body = build_variant(
            name, pretrained=pretrained, save_memory=save_memory, drop_path=drop_path, kernel_size=kernel_size
        )
    else:
        choice = choose_pretrained(None, pretrained, kernel_size)  # before building: no model for a bad value
        body = FullNet(
            **spec.fullnet_kwargs(drop_path=drop_path, kernel_size=choice.kernel_size, save_memory=save_memory)
        )
        load_chosen(body, choice)
    return RevColFPN(body, layers, trainable_columns, **fpn_options)


def _spec(name: str | Mapping[str, Any]) -> VariantSpec:
    """The configuration ``name`` stands for; a custom one with a drop-path rate of 0."""
    if isinstance(name, str):
        return get_variant(name)
    if not isinstance(name, Mapping):
        raise ConfigError(
            f"name must be a RevCol variant ({', '.join(VARIANTS)}) or a mapping with {', '.join(CUSTOM_KEYS)} "
            f"(a custom configuration), got {type(name).__name__}"
        )
    missing = [key for key in CUSTOM_KEYS if key not in name]
    unknown = sorted(str(key) for key in name if key not in CUSTOM_KEYS + CUSTOM_OPTIONAL_KEYS)
    if missing or unknown:
        raise ConfigError(
            f"a custom RevCol configuration takes {', '.join(CUSTOM_KEYS)} and optionally "
            f"{', '.join(CUSTOM_OPTIONAL_KEYS)}; missing: {missing or 'none'}, unknown: {unknown or 'none'}"
        )
    return VariantSpec(drop_path=0.0, **name)
