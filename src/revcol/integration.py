"""Ultralytics integration: one YAML line names a RevCol backbone (``docs/design.md``, section "YAML contract").

``register()`` wraps a few Ultralytics functions (never copies them) and ``unregister()`` puts
the originals back. The YAML line ``[-1, 1, revcol_small, [{options}]]`` is expanded before
Ultralytics parses the model into five layers, so the head sees the documented indexes:

    0  RevColBackbone   the backbone, returns [c0, c1, c2, c3]
    1  Index 0          stride 4
    2  Index 1          stride 8  (P3)
    3  Index 2          stride 16 (P4)
    4  Index 3          stride 32 (P5)
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm, LayerNorm2d

from revcol.errors import ConfigError
from revcol.model import ConvNextBlock, FullNet, Fusion, Level, SubNet, UpSample
from revcol.variants import VARIANTS, get_variant, load_weights

CONFIG_DIR = Path(__file__).parent / "configs"
CUSTOM_NAME = "revcol"
BACKBONE_NAMES = frozenset({CUSTOM_NAME, *VARIANTS})
BACKBONE_LAYERS = 5  # the backbone module and one Index per level
VARIANT_OPTIONS = frozenset({"pretrained", "save_memory", "drop_path", "kernel_size"})
CUSTOM_OPTIONS = VARIANT_OPTIONS | {"channels", "layers", "num_subnet"}


class RevColBackbone(FullNet):
    """A RevCol backbone as an Ultralytics layer: ``RevColBackbone("revcol_small", {"pretrained": path})``.

    ``name`` is a variant of ``revcol.VARIANTS`` or ``"revcol"`` for a custom configuration given by
    ``channels``, ``layers`` and ``num_subnet`` in ``options``. Other options: ``pretrained`` (``true``, a
    published tag or a checkpoint path, see ``revcol.variants.load_weights``), ``save_memory``,
    ``drop_path``, ``kernel_size``. Returns the list ``[c0, c1, c2, c3]``.
    """

    def __init__(self, name: str = "revcol_small", options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        allowed = CUSTOM_OPTIONS if name == CUSTOM_NAME else VARIANT_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for RevCol backbone {name!r}; allowed: {sorted(allowed)}")
        pretrained = options.pop("pretrained", None)
        if name == CUSTOM_NAME:
            missing = sorted({"channels", "layers", "num_subnet"} - set(options))
            if missing:
                raise ConfigError(
                    f"a custom 'revcol' backbone needs channels, layers and num_subnet; missing {missing} "
                    "(e.g. {channels: [16, 32, 64, 128], layers: [1, 1, 1, 1], num_subnet: 2})"
                )
            config = {"drop_path": 0.0, **options}
        else:
            config = get_variant(name).fullnet_kwargs(**options)
        super().__init__(**config)
        self.variant = name
        load_weights(self, None if name == CUSTOM_NAME else name, pretrained)


def expand_backbone(d: dict) -> dict:
    """Rewrite a model dict whose first backbone row names a RevCol backbone into the five-layer form."""
    backbone = d.get("backbone") or []
    rows = [i for i, row in enumerate(backbone) if _is_revcol_row(row)]
    if not rows:
        return d
    if rows != [0]:
        raise ConfigError(
            f"a RevCol backbone must be the first backbone row (it takes the image); found at backbone rows {rows}"
        )
    source, repeats, name, args = backbone[0]
    if source != -1 or repeats != 1:
        raise ConfigError(f"the RevCol backbone row must read [-1, 1, {name}, [...]], got {backbone[0]}")
    options = _parse_options(name, args)
    channels = options["channels"] if name == CUSTOM_NAME else get_variant(name).channels
    if not (isinstance(channels, (list, tuple)) and len(channels) == 4):
        raise ConfigError(f"RevCol option channels must be 4 ints, got {channels!r}")
    expanded = [[-1, 1, RevColBackbone.__name__, [name, options]]]
    expanded += [[0, 1, "Index", [c, level]] for level, c in enumerate(channels)]
    d["backbone"] = expanded + backbone[1:]
    _check_sources(d["backbone"] + d.get("head", []))
    return d


def without_pretrained(d: dict) -> dict:
    """A copy of model dict ``d`` whose RevCol backbone row loads no pretrained weights.

    For a model that gets trained weights right after it is built (fine-tuning or resuming from a ``.pt``):
    the ImageNet file named in its YAML is then neither needed nor read.
    """
    d = copy.deepcopy(d)
    for row in d.get("backbone") or []:
        if _is_revcol_row(row) and row[3] and isinstance(row[3][0], Mapping):
            row[3][0].pop("pretrained", None)
    return d


def _is_revcol_row(row: Any) -> bool:
    """Rows naming ``revcol*``; an unknown ``revcol_*`` name fails here with the list of known ones."""
    if not (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[2], str)):
        return False
    name = row[2]
    if name.lower().startswith(CUSTOM_NAME) and name not in BACKBONE_NAMES and name != RevColBackbone.__name__:
        raise ConfigError(
            f"unknown RevCol backbone {name!r} in model YAML; known: {', '.join(sorted(BACKBONE_NAMES))} "
            f"({CUSTOM_NAME!r} takes a custom configuration)"
        )
    return name in BACKBONE_NAMES


def _parse_options(name: str, args: Any) -> dict:
    if args is None or (isinstance(args, list) and not args):
        return {}
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], Mapping):
        return dict(args[0])
    raise ConfigError(
        f"RevCol backbone {name!r} takes [] or one mapping of options, e.g. "
        f"[{{pretrained: revcol_small_1k.pth, save_memory: true, drop_path: 0.2}}], got {args!r}"
    )


def _check_sources(rows: list) -> None:
    """Every 'from' index must name an earlier layer; layer 0 (the list output) only feeds the Index rows."""
    layout = "RevCol backbone layers: 0 backbone (list), 1 stride 4, 2 stride 8, 3 stride 16, 4 stride 32"
    for i, row in enumerate(rows[BACKBONE_LAYERS:], start=BACKBONE_LAYERS):
        for source in row[0] if isinstance(row[0], list) else [row[0]]:
            if not isinstance(source, int) or not -i <= source < i:
                raise ConfigError(f"layer {i} {row} takes input from layer {source}, which does not exist. {layout}")
            if source % i == 0 and row[2] != "Index":
                raise ConfigError(f"layer {i} {row} takes the backbone's list output (layer 0); use 1-4. {layout}")


def supported_ultralytics() -> str:
    """The Ultralytics versions this installation of revcol supports, as its package metadata declares them."""
    try:
        requirements = importlib.metadata.requires("revcol") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("revcol is not installed, so its Ultralytics range is unknown: pip install .") from None
    for requirement in requirements:
        match = re.fullmatch(r"ultralytics\s*([<>=!~][^;]*)", requirement.strip())
        if match:
            return match.group(1).replace(" ", "")
    raise RuntimeError(f"revcol's metadata names no Ultralytics version range: {requirements}")


_patches: list[tuple[Any, str, Any]] = []
_MISSING = object()
_SAFE_GLOBALS = [
    RevColBackbone,
    FullNet,
    SubNet,
    Level,
    Fusion,
    UpSample,
    ConvNextBlock,
    LayerNorm,
    LayerNorm2d,
    DropPath,
]


def _patch(owner: Any, name: str, value: Any) -> None:
    _patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
    setattr(owner, name, value)


def is_registered() -> bool:
    """Whether ``register()`` is in effect."""
    return bool(_patches)


def register() -> None:
    """Make the RevCol backbones nameable in Ultralytics YAMLs. Calling it again does nothing."""
    if _patches:
        return
    import ultralytics
    from ultralytics.engine.model import Model
    from ultralytics.nn import tasks
    from ultralytics.utils.checks import check_version

    supported = supported_ultralytics()
    if not check_version(ultralytics.__version__, supported):
        raise RuntimeError(
            f"revcol supports ultralytics {supported}; found {ultralytics.__version__}. "
            f"Install a supported release: pip install 'ultralytics{supported}'"
        )
    from revcol import trainers

    _patch(tasks, RevColBackbone.__name__, RevColBackbone)
    _patch(tasks, "parse_model", _wrap_parse_model(tasks.parse_model))
    _patch(tasks, "check_yaml", _wrap_check_yaml(tasks.check_yaml))
    _patch(tasks.BaseModel, "predict", _wrap_predict(tasks.BaseModel.predict))
    _patch(tasks.RTDETRDetectionModel, "predict", _wrap_predict(tasks.RTDETRDetectionModel.predict))
    _patch(Model, "_smart_load", trainers.wrap_smart_load(Model._smart_load))
    torch.serialization.add_safe_globals(_SAFE_GLOBALS)


def unregister() -> None:
    """Undo ``register()``: every patched Ultralytics object is restored (by identity)."""
    while _patches:
        owner, name, original = _patches.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    kept = [g for g in torch.serialization.get_safe_globals() if g not in _SAFE_GLOBALS]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(kept)


def _wrap_parse_model(parse_model: Callable) -> Callable:
    @functools.wraps(parse_model)
    def wrapper(d, ch, verbose=True):
        return parse_model(expand_backbone(d), ch, verbose)

    return wrapper


def _wrap_check_yaml(check_yaml: Callable) -> Callable:
    @functools.wraps(check_yaml)
    def wrapper(file, *args, **kwargs):
        shipped = CONFIG_DIR / str(file)
        if str(file) == Path(file).name and not Path(file).exists() and shipped.is_file():
            return str(shipped)
        return check_yaml(file, *args, **kwargs)

    return wrapper


def _wrap_predict(predict: Callable) -> Callable:
    """Embedding a RevCol backbone layer (its output is a list) means embedding its four levels."""

    @functools.wraps(predict)
    def wrapper(self, x, *args, embed=None, **kwargs):
        if embed:
            backbones = {i for i, m in enumerate(self.model) if isinstance(m, RevColBackbone)}
            embed = sorted({j for i in embed for j in (range(i + 1, i + BACKBONE_LAYERS) if i in backbones else [i])})
        return predict(self, x, *args, embed=embed, **kwargs)

    return wrapper
