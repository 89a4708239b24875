"""RevCol as timm models: the authors' ImageNet classifier on ``FullNet``, registered with timm from outside it.

``import revcol`` imports this module, which registers one timm entrypoint per ``revcol.VARIANTS`` name, with a
pretrained config per published file of ``revcol.weights.WEIGHTS``. ``timm.create_model("revcol_small",
pretrained=True)`` loads through ``revcol.weights`` (torch's hub cache, ``REVCOL_WEIGHTS_URL``) and
``load_classifier_weights`` (weights-only reading, strict on the backbone), never through timm's downloader.
``features_only`` wraps the classifier in timm's ``FeatureGetterNet`` (default) or ``FeatureHookNet``, or in
``RevColFeatureListNet`` / ``RevColFeatureDictNet``, timm's list and dict extractors fitted to a column network.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, SelectAdaptivePool2d, nchw_to, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

from revcol import weights
from revcol._timm_features import RevColFeatureDictNet, RevColFeatureListNet, feature_cfg, output_format
from revcol.checkpoints.backbone import HeadRule, LoadResult, load_pretrained
from revcol.core import param_groups
from revcol.core.blocks import NORM_EPS
from revcol.core.network import FullNet
from revcol.core.variants import VARIANTS, get_variant
from revcol.errors import CheckpointError, ConfigError
from revcol.weights.pretrained import PretrainedChoice, choose_pretrained, load_chosen

POOL_TYPES = ("avg", "max", "avgmax", "")  # pooled width must stay C3: the norm's shape is fixed by the checkpoints
HEAD_PREFIX = "cls."
# RevColClassifier's own keywords; the others are FullNet's.
CLASSIFIER_KEYWORDS = ("num_classes", "global_pool", "drop_rate", "head_init_scale", "in_chans", "device", "dtype")
# The 1k files trained with intermediate supervision have four heads, one per quarter of the columns; the last
# one reads the last column, so it is the classifier of the finished network.
LAST_SUPERVISION_HEAD = "cls_blocks.3."

__all__ = [
    "ClassifierHead",
    "RevColClassifier",
    "RevColFeatureDictNet",
    "RevColFeatureListNet",
    "create",
    "default_cfgs_of",
    "load_classifier_weights",
    "register",
]


class ClassifierHead(nn.Module):
    """The authors' head: global pool, LayerNorm (eps 1e-6), Linear; ``classifier.0`` and ``classifier.1``.

    The norm is channels-first so that it also applies per position when pooling is off (``global_pool=''``),
    as timm's ConvNeXt head does; on the pooled (N, C, 1, 1) map it equals the authors' LayerNorm over C. Unpooled,
    the Linear classifies every position ((N, num_classes, H, W) logits), as ConvNeXt's 1x1 convolution does there:
    the weights keep the authors' shape whatever the pooling.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_head(num_classes, pool_type)
        self.in_features = in_features
        self.num_classes = num_classes
        self.pool_type = pool_type
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type)
        self.classifier = nn.Sequential(
            LayerNorm2d(in_features, eps=NORM_EPS, device=device, dtype=dtype),
            _linear(in_features, num_classes, device, dtype),
        )
        self.drop = nn.Dropout(drop_rate)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """A new, freshly initialised Linear for ``num_classes`` (0: none); the norm is kept, and so is the pooling
        unless ``pool_type`` names another. The new modules take the head's device, dtype and train/eval mode."""
        pool_type = self.pool_type if pool_type is None else pool_type
        _check_head(num_classes, pool_type)
        if pool_type != self.pool_type:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type).train(self.training)
            self.pool_type = pool_type
        norm = self.classifier[0].weight
        self.classifier[1] = _linear(self.in_features, num_classes, norm.device, norm.dtype).train(self.training)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.classifier[0](self.global_pool(x))
        if self.pool_type:
            x = x.flatten(1)
        x = self.drop(x)
        if pre_logits:
            return x
        if self.pool_type or not self.num_classes:
            return self.classifier[1](x)
        # channels last for the Linear, then back: the logits keep the features' NCHW layout
        return self.classifier[1](x.movedim(1, -1)).movedim(-1, 1)


def _linear(in_features: int, num_classes: int, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    if num_classes == 0:
        return nn.Identity()
    linear = nn.Linear(in_features, num_classes, device=device, dtype=dtype)
    trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


def _check_head(num_classes: int, pool_type: str) -> None:
    if pool_type not in POOL_TYPES:
        raise ConfigError(f"global_pool must be one of {', '.join(map(repr, POOL_TYPES))}, got {pool_type!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")


def _placement(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype to build: the given ones, else torch's defaults (a ``with torch.device`` included)."""
    try:
        device = torch.empty(0).device if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device must be a torch.device or a device name such as 'cpu', 'cuda:0' or 'meta', got {device!r}"
        ) from None
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    return device, dtype


class RevColClassifier(FullNet):
    """A ``FullNet`` with the authors' classifier ``cls`` on the last column's coarsest map, and timm's model API.

    Backbone parameter names are ``FullNet``'s (``stem.*``, ``subnet*``), the head's ``cls.classifier.{0,1}.*``,
    so the authors' files load as they are. ``forward_features`` returns that coarsest map (N, C3, H/32, W/32);
    ``forward_intermediates`` the last column's four maps. Backbone keywords are ``FullNet``'s.

    Args:
        num_classes: Classes of the Linear; 0 for none (features out).
        global_pool: "avg" (the authors'), "max", "avgmax", or "" (none: features or logits per position).
        drop_rate: Dropout before the Linear.
        head_init_scale: Multiplies the initial Linear weight and bias.
        in_chans: Input channels; only 3 (``in_chans`` is also an attribute, as on timm's models).
        device: Where to allocate and initialise the parameters ("meta": allocate nothing); default: torch's
            default device (a ``with torch.device(...)`` block included).
        dtype: Floating-point dtype of the parameters; default: torch's default dtype.
        **backbone: ``FullNet``'s keywords (``channels``, ``layers``, ``num_subnet``, ``kernel_size``, ...).

    Examples:
        >>> model = RevColClassifier(num_classes=10, dtype=torch.float64, **VARIANTS["revcol_tiny"].fullnet_kwargs())
        >>> model(torch.randn(2, 3, 224, 224, dtype=torch.float64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        head_init_scale: float = 1.0,
        in_chans: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **backbone: Any,
    ) -> None:
        if in_chans != 3:
            raise ConfigError(f"RevCol takes RGB images: in_chans must be 3, got {in_chans!r}")
        device, dtype = _placement(device, dtype)
        # FullNet alone would allocate on the default device in the default dtype: built on the meta device instead,
        # the backbone is allocated once, where and as asked (nothing at all on "meta"), then initialised there.
        with torch.device("meta"):
            super().__init__(**backbone)
        self.to(dtype=dtype).to_empty(device=device)
        self.init_weights()
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.channels[-1]
        self.drop_rate = drop_rate
        self.cls = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, device=device, dtype=dtype)
        if num_classes:
            # As the authors: scales the initial logits (fine-tuning recipes use values below 1).
            with torch.no_grad():
                self.cls.classifier[1].weight.mul_(head_init_scale)
                self.cls.classifier[1].bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last column's stride-32 map (N, C3, H/32, W/32), before the head."""
        return super().forward_features(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, norm and (unless ``pre_logits``) classify the output of ``forward_features``."""
        return self.cls(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The last column's maps chosen by ``indices`` (timm's rules: an int takes the last n), and the final map.

        The maps are ``output_fmt`` ("NCHW" or "NHWC", a permuted view); the final map is ``forward_features``'
        (NCHW). ``norm`` changes nothing: the only final norm sits in the head, after pooling, as in timm's ConvNeXt.
        ``stop_early`` saves nothing: every level of every column but the last feeds the last column's maps.
        """
        fmt = output_format(output_fmt)
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        features = super().forward_features(x)
        intermediates = [nchw_to(features[index], fmt) for index in take_indices]
        if intermediates_only:
            return intermediates
        return features[-1], intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the head if ``prune_head``; no backbone layer can go (see ``forward_intermediates``)."""
        take_indices, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def get_classifier(self) -> nn.Module:
        return self.cls.classifier[1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new Linear for ``num_classes`` (0: features out) on the model's device and dtype; the pooling is kept
        unless ``global_pool`` names another ('' for none: features or logits per position)."""
        self.cls.reset(num_classes, global_pool)
        self.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """RevCol's own memory saving: the reversible backward (``save_memory``); outputs and gradients are equal."""
        self.save_memory = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, str] | Callable[[str], int]:
        """Fine: the authors' column-aware depth of each parameter (``param_groups.layer_id``); coarse: columns."""
        if coarse:
            return {"stem": r"^stem", "blocks": r"^subnet(\d+)"}
        return partial(param_groups.layer_id, layers=self.layers, num_subnet=self.num_subnet)

    def no_weight_decay(self) -> set[str]:
        """The parameters RevCol keeps out of weight decay (``param_groups.exempt_from_weight_decay``, the rule the
        Ultralytics trainers follow too): column alphas and layer-scale gammas. timm's own rule for 1-D tensors
        (norms, biases) already covers the gammas, not the 4-D alphas."""
        return {name for name, _ in self.named_parameters() if param_groups.exempt_from_weight_decay(name)}


def load_classifier_weights(model: RevColClassifier, path: str | os.PathLike) -> LoadResult:
    """Load an authors' (or our) classifier file: the backbone strictly, then the head.

    ``revcol.load_pretrained`` with the classifier's ``HeadRule``: the same reading and backbone check, and
    nothing is copied unless the head fits too. The head is ``cls.*``, or, in files trained with intermediate
    supervision, the last of the heads ``cls_blocks.3.*``. Its Linear is loaded only if its class count is the
    model's (timm's rule: another ``num_classes`` means a new classifier); a file without any head leaves the head
    as initialised. The timm models' ``pretrained=True`` loads through this function.
    """
    return load_pretrained(model, path, HeadRule(HEAD_PREFIX, partial(_classifier_head, model.num_features)))


def _classifier_head(
    channels: int, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: str | os.PathLike
) -> dict[str, str]:
    """The file's head tensors that fit the model's head ``own`` (a ``channels``-wide ``ClassifierHead``)."""
    prefix = HEAD_PREFIX if any(k.startswith(HEAD_PREFIX) for k in state) else LAST_SUPERVISION_HEAD
    head = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    usable = [k for k, v in head.items() if k in own and own[k].shape == v.shape]
    norm_keys = [k for k in own if k.startswith("classifier.0.")]
    if head and not all(k in usable for k in norm_keys):
        raise CheckpointError(
            f"{path}: the head under {prefix!r} does not fit a {channels}-channel RevCol classifier "
            f"(its tensors: {', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(head.items()))})"
        )
    return {prefix + k: k for k in usable}


def _default_cfg(entry: weights.PublishedWeights | None) -> dict[str, Any]:
    size = entry.resolution if entry else 224
    return {
        "url": entry.url if entry else "",
        # a pretraining file whose head is not published (MegData) makes a headless model by default
        "num_classes": 1000 if entry is None else entry.num_classes or 0,
        "input_size": (3, size, size),
        "min_input_size": (3, 32, 32),
        "pool_size": (size // 32, size // 32),
        # The authors' evaluation: resize to 256/224 of the size and centre-crop at 224; squash above 224.
        "crop_pct": 0.875 if size <= 224 else 1.0,
        "crop_mode": "center" if size <= 224 else "squash",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "cls.classifier.1",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2212.11696",
        "paper_name": "Reversible Column Networks",
        "origin_url": "https://github.com/megvii-research/RevCol",
    }


def default_cfgs_of(variant: str) -> dict[str, Any]:
    """timm's pretrained configs of ``variant``: one per published file, the default tag first; one without weights."""
    published = weights.WEIGHTS.get(variant, {})
    default = weights.DEFAULT_TAGS.get(variant)
    tags = sorted(published, key=lambda tag: tag != default)
    if not tags:
        return {variant: _default_cfg(None)}
    return {f"{variant}.{tag}": _default_cfg(published[tag]) for tag in tags}


def _build(variant: str, choice: PretrainedChoice, drop_path_rate: float | None = None, **kwargs: Any) -> nn.Module:
    head = {k: kwargs.pop(k) for k in CLASSIFIER_KEYWORDS if k in kwargs}
    drop_path = kwargs.pop("drop_path", drop_path_rate)
    model = RevColClassifier(**head, **get_variant(variant).fullnet_kwargs(drop_path=drop_path, **kwargs))
    load_chosen(model, choice, load_classifier_weights)
    return model


def create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The timm entrypoint of every variant; ``pretrained`` loads the config's ``file``, else its tag's download.

    What that names is decided by ``revcol.weights.pretrained.choose_pretrained`` before building (a published file
    fixes the kernel size: RevCol-H's k7 files) and loaded by ``load_chosen`` with ``load_classifier_weights``.
    With ``features_only``, ``feature_cls`` ("getter", "hook", "list", "dict"), ``out_indices``, ``out_map`` and
    ``output_fmt`` choose the extractor (``revcol._timm_features.feature_cfg``).
    """
    if not isinstance(pretrained, bool):
        # timm's contract is a flag: a tag or a path here would otherwise load the default file without a word.
        tags = ", ".join(f"'{name}'" for name in default_cfgs_of(variant) if "." in name) or "none published"
        raise ConfigError(
            f"timm's pretrained= is True or False, got {pretrained!r}: name a tag in the model name ({tags}) or a "
            "file with pretrained_cfg_overlay=dict(file=PATH)"
        )
    if kwargs.pop("output_stride", None) not in (None, 32):  # transformers' TimmBackbone passes it from 5.1 on
        raise ConfigError("RevCol's output stride is 32 (it has no dilated variant): output_stride must be None or 32")
    features = feature_cfg(kwargs) if kwargs.get("features_only") else None
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop("pretrained_cfg", None),
        pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None),
    )
    # a file of the config (pretrained_cfg_overlay) is a path, never a tag: a Path object is never looked up
    named = (Path(cfg.file) if cfg.file else cfg.tag or True) if pretrained else None
    choice = choose_pretrained(variant, named, kwargs.get("kernel_size"))
    if not pretrained and cfg.tag and "kernel_size" not in kwargs:
        # A tag names an architecture as well as weights (RevCol-H's k7 files): built without them, the model must
        # still take them, e.g. when transformers builds from a saved config and loads its own file afterwards.
        kwargs["kernel_size"] = choose_pretrained(variant, cfg.tag).kernel_size
    if choice.kernel_size is not None:
        kwargs["kernel_size"] = choice.kernel_size
    # timm is told pretrained=False: the weights are loaded by _build, before any features_only wrapping.
    return build_model_with_cfg(
        partial(_build, variant, choice),
        variant,
        pretrained=False,
        pretrained_cfg=cfg,
        feature_cfg=features,
        **kwargs,
    )


default_cfgs: dict[str, Any] = {}  # timm's register_model reads this module attribute


def register(variant: str) -> Callable[..., nn.Module]:
    """Make ``variant`` (a ``revcol.VARIANTS`` name) a timm model, with a pretrained config per published file."""
    get_variant(variant)
    default_cfgs.update(generate_default_cfgs(default_cfgs_of(variant)))

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm entrypoint of {variant} (see ``revcol.timm_models.create``)."
    setattr(sys.modules[__name__], variant, entrypoint)
    return register_model(entrypoint)


for _name in VARIANTS:
    register(_name)
