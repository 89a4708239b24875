"""timm's ``features_only`` extractors for the RevCol timm models (``revcol.timm_models``).

timm's ``FeatureListNet`` and ``FeatureDictNet`` rebuild a network from its children run one after another, which a
column network is not: a column takes the previous column's four maps. ``RevColFeatureListNet`` and
``RevColFeatureDictNet`` are those classes (``isinstance`` holds, their API stays) collecting the maps with the
model's ``forward_intermediates`` instead, as timm's ``FeatureGetterNet`` does. ``feature_cfg`` turns the
``features_only`` keywords of ``timm.create_model`` into timm's ``feature_cfg`` with the class to build.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import Format
from timm.models import FeatureDictNet, FeatureHookNet, FeatureInfo, FeatureListNet
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn

from revcol.errors import ConfigError

FEATURE_CLASSES = ("getter", "hook", "list", "dict")
OUTPUT_FORMATS = ("NCHW", "NHWC")
DEFAULT_OUT_INDICES = (0, 1, 2, 3)

__all__ = ["RevColFeatureDictNet", "RevColFeatureListNet", "feature_cfg", "output_format"]


def output_format(output_fmt: str) -> Format:
    """``output_fmt`` as timm's ``Format``, if RevCol's maps can be given that way ("NCHW" or "NHWC").

    Raises:
        ConfigError: any other format.
    """
    if output_fmt not in OUTPUT_FORMATS:  # Format is a str enum: its members equal their names
        raise ConfigError(f"RevCol feature maps are 'NCHW' or 'NHWC', got output_fmt={output_fmt!r}")
    return Format(output_fmt)


class RevColFeatureDictNet(FeatureDictNet):
    """timm's ``FeatureDictNet`` for RevCol: ``forward`` returns an ``OrderedDict`` of the last column's maps.

    It keeps the whole model, as ``FeatureGetterNet`` does (``model.*`` in the state dict, the head pruned), and its
    maps are that extractor's, bit for bit.

    Args:
        model: A ``revcol.RevColClassifier``; its head is removed.
        out_indices: Levels to return (0 to 3, strides 4 to 32; an int takes the last n).
        out_map: One key per level of ``out_indices``, made ``str`` as timm does; default ``str(level)``.
        output_fmt: "NCHW" or "NHWC".

    Examples:
        >>> net = timm.create_model("revcol_tiny", features_only=True, feature_cls="dict", out_indices=(2, 3),
        ...                         out_map=("p4", "p5"))
        >>> {k: v.shape for k, v in net(torch.randn(1, 3, 224, 224)).items()}
        {'p4': torch.Size([1, 256, 14, 14]), 'p5': torch.Size([1, 512, 7, 7])}
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: int | Sequence[int] = DEFAULT_OUT_INDICES,
        out_map: Sequence[int | str] | None = None,
        output_fmt: str = "NCHW",
    ) -> None:
        nn.ModuleDict.__init__(self)  # not FeatureDictNet's, which takes the model apart
        self.output_fmt = output_format(output_fmt)
        out_indices, _ = feature_take_indices(len(model.feature_info), out_indices)
        if len(set(out_indices)) != len(out_indices):
            raise ConfigError(f"out_indices must name distinct levels, got {out_indices}")
        keys = [str(key) for key in (out_indices if out_map is None else out_map)]
        if len(keys) != len(out_indices) or len(set(keys)) != len(keys):
            raise ConfigError(f"out_map needs one distinct key per level of out_indices {out_indices}, got {out_map!r}")
        model.prune_intermediate_layers(out_indices)  # drops the head, as FeatureGetterNet has it do
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.return_layers = dict(zip(self.feature_info.module_name(), keys, strict=True))
        self.model = model

    @property
    def grad_checkpointing(self) -> bool:
        """The model's ``save_memory``: RevCol's reversible backward is its gradient checkpointing."""
        return self.model.save_memory

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch the model's reversible backward; maps and gradients are the same either way."""
        self.model.set_grad_checkpointing(enable)

    def _collect(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # return_layers picks the levels, as in timm's classes: transformers' TimmBackbone swaps in every level
        # to return hidden states
        levels = [info["module"] for info in self.feature_info.info]
        indices = [levels.index(module) for module in self.return_layers]
        maps = self.model.forward_intermediates(x, indices=indices, output_fmt=self.output_fmt, intermediates_only=True)
        return OrderedDict(zip(self.return_layers.values(), maps, strict=True))


class RevColFeatureListNet(RevColFeatureDictNet, FeatureListNet):
    """timm's ``FeatureListNet`` for RevCol: ``RevColFeatureDictNet``'s maps as a list, in ``out_indices`` order.

    Args:
        model: A ``revcol.RevColClassifier``; its head is removed.
        out_indices: Levels to return (0 to 3, strides 4 to 32; an int takes the last n).
        output_fmt: "NCHW" or "NHWC".
    """

    def __init__(
        self, model: nn.Module, out_indices: int | Sequence[int] = DEFAULT_OUT_INDICES, output_fmt: str = "NCHW"
    ) -> None:
        super().__init__(model, out_indices, output_fmt=output_fmt)


CLASSES: dict[str, type[nn.Module]] = {
    "getter": FeatureGetterNet,
    "hook": FeatureHookNet,
    "list": RevColFeatureListNet,
    "dict": RevColFeatureDictNet,
}
# timm's own list/dict classes, passed as classes, would take the model apart: ours stand in for them.
CLASS_NAMES = {FeatureListNet: "list", FeatureDictNet: "dict", **{cls: name for name, cls in CLASSES.items()}}


def feature_cfg(kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's ``feature_cfg`` for ``features_only``: the extractor class, and its options taken out of ``kwargs``.

    Args:
        kwargs: ``timm.create_model``'s keywords; ``feature_cls``, ``out_indices``, ``out_map`` and ``output_fmt``
            are removed from it.

    Returns:
        ``{"feature_cls": class, "out_indices": ..., ...}`` for ``build_model_with_cfg``.

    Raises:
        ConfigError: another ``feature_cls``, ``out_map`` without ``feature_cls="dict"``, a format that cannot be given.
    """
    requested = kwargs.pop("feature_cls", "getter")
    if isinstance(requested, str):
        name = requested.lower()
    else:
        name = next((name for cls, name in CLASS_NAMES.items() if cls is requested), None)
    if name not in FEATURE_CLASSES:
        raise ConfigError(
            "RevCol features_only supports feature_cls 'getter' (default), 'hook', 'list' or 'dict' (or timm's "
            f"classes of those names), got {requested!r}; 'fx' cannot trace the reversible columns"
        )
    cfg = {"feature_cls": CLASSES[name], "out_indices": kwargs.pop("out_indices", DEFAULT_OUT_INDICES)}
    if "out_map" in kwargs:
        if name != "dict":
            raise ConfigError(f"out_map names the keys of feature_cls='dict' outputs, got feature_cls={requested!r}")
        cfg["out_map"] = kwargs.pop("out_map")
    if "output_fmt" in kwargs:
        cfg["output_fmt"] = output_format(kwargs.pop("output_fmt"))
        if name == "hook" and cfg["output_fmt"] != "NCHW":
            raise ConfigError("feature_cls='hook' returns the NCHW maps its hooks see; NHWC needs getter, list or dict")
    return cfg
