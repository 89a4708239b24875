"""The YAML contract: how a model YAML names a RevCol backbone (``docs/design.md``, section "YAML contract").

Plain functions on the model dict, with no Ultralytics import, so every module that needs the contract
(the backbone layer, the trainer hooks, the hook table) reads it from here and none imports another back.
The RevCol row ``[-1, 1, revcol_small, [{options}]]`` expands into the layers of ``LAYOUT`` before Ultralytics
parses the dict: the backbone, then one ``Index`` per level. ``OPTIONS`` are what the row may set.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from revcol.core.variants import VARIANTS, get_variant
from revcol.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CUSTOM_NAME = "revcol"
BACKBONE_NAMES = frozenset({CUSTOM_NAME, *VARIANTS})
LAYER_NAME = "RevColBackbone"  # the Ultralytics layer the row becomes (revcol.ultralytics.backbone.RevColBackbone)
LEVEL_STRIDES = (4, 8, 16, 32)  # of the backbone's outputs c0..c3, one per level


class Layer(NamedTuple):
    """One layer of the expanded row: its index in the model, its module, what it outputs."""

    index: int
    module: str
    output: str


# Layer 0 returns every level; layer l + 1 picks level l (Ultralytics' P<k> is the map at stride 2**k).
LAYOUT: tuple[Layer, ...] = (
    Layer(0, LAYER_NAME, "the list [c0, c1, c2, c3] (only the Index layers read it)"),
    *(
        Layer(level + 1, f"Index {level}", f"stride {s} (P{s.bit_length() - 1})")
        for level, s in enumerate(LEVEL_STRIDES)
    ),
)
BACKBONE_LAYERS = len(LAYOUT)
LAYOUT_TEXT = "RevCol backbone layers: " + ", ".join(
    f"{layer.index} {'backbone (list)' if layer.index == 0 else layer.output.split(' (')[0]}" for layer in LAYOUT
)


class Option(NamedTuple):
    """An option of a RevCol row: its name, whether only a custom ``revcol`` row takes it (and must), its meaning."""

    name: str
    custom: bool
    required: bool
    meaning: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "pretrained",
        False,
        False,
        "`true` (the variant's default tag), a published tag, or a checkpoint path; loaded when the model is built",
    ),
    Option("save_memory", False, False, "`true`/`false`: the reversible backward, or plain autograd"),
    Option("drop_path", False, False, "stochastic-depth rate in [0, 1); a variant's default is its paper rate"),
    Option("kernel_size", False, False, "odd depthwise kernel size; a `pretrained` file may fix it"),
    Option("lr_decay", False, False, "layer-wise lr decay in (0, 1] for the RevCol trainers; 1 or absent: none"),
    Option("channels", True, True, "4 ints: the widths of levels 0-3"),
    Option("layers", True, True, "4 ints: the blocks of levels 0-3"),
    Option("num_subnet", True, True, "the number of columns"),
    Option("level0_from_coarsest", True, False, "`true`: level 0 also reads level 3, as in `revcol_huge`"),
)
VARIANT_OPTIONS = frozenset(option.name for option in OPTIONS if not option.custom)
CUSTOM_REQUIRED = tuple(option.name for option in OPTIONS if option.required)
CUSTOM_OPTIONS = frozenset(option.name for option in OPTIONS)
CUSTOM_EXAMPLE = "{channels: [16, 32, 64, 128], layers: [1, 1, 1, 1], num_subnet: 2}"


def shipped_configs() -> list[str]:
    """The model YAMLs that ship with revcol, loadable by bare name (e.g. ``YOLO("yolo-revcol-sem.yaml")``)."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def missing_custom_options(options: Mapping[str, Any]) -> list[str]:
    """The options a custom ``revcol`` backbone needs that ``options`` lacks."""
    return [name for name in CUSTOM_REQUIRED if name not in options]


def custom_options_error(missing: list[str]) -> ConfigError:
    return ConfigError(
        f"a custom {CUSTOM_NAME!r} backbone needs channels, layers and num_subnet; missing {missing} "
        f"(e.g. [-1, 1, {CUSTOM_NAME}, [{CUSTOM_EXAMPLE}]])"
    )


def expand_backbone(d: dict) -> dict:
    """Rewrite a model dict whose first backbone row names a RevCol backbone into the five-layer form."""
    backbone = d.get("backbone") or []
    _check_placement(backbone, d.get("head") or [])
    if not (backbone and is_revcol_row(backbone[0])):
        return d
    source, repeats, name, args = backbone[0]
    if source != -1 or repeats != 1:
        raise ConfigError(f"the RevCol backbone row must read [-1, 1, {name}, [...]], got {backbone[0]}")
    options = _parse_options(name, args)
    if name == CUSTOM_NAME:
        missing = missing_custom_options(options)
        if missing:
            raise custom_options_error(missing)
        channels = options["channels"]
    else:
        channels = get_variant(name).channels
    if not (isinstance(channels, (list, tuple)) and len(channels) == 4):
        raise ConfigError(f"RevCol option channels must be 4 ints, got {channels!r}")
    expanded = [[-1, 1, LAYER_NAME, [name, options]]]
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
        if is_revcol_row(row) and row[3] and isinstance(row[3][0], Mapping):
            row[3][0].pop("pretrained", None)
    return d


def names_revcol_backbone(d: dict) -> bool:
    """Whether model dict ``d`` has a RevCol backbone row."""
    return any(is_revcol_row(row) for row in d.get("backbone") or [])


def head_modules(d: dict) -> list[str]:
    """The module names of the head rows of model dict ``d``, in order."""
    return [row[2] for row in d.get("head") or [] if isinstance(row, (list, tuple)) and len(row) > 2]


def _check_placement(backbone: list, head: list) -> None:
    """A RevCol row takes the image, so the first backbone row is the only place for it."""
    misplaced = [f"backbone row {i} {row}" for i, row in enumerate(backbone) if i and is_revcol_row(row)]
    misplaced += [f"head row {i} {row}" for i, row in enumerate(head) if is_revcol_row(row)]
    if misplaced:
        raise ConfigError(
            f"a RevCol backbone must be the first backbone row (it takes the image); found at {'; '.join(misplaced)}"
        )


def is_revcol_row(row: Any) -> bool:
    """Whether ``row`` names a RevCol backbone; an unknown ``revcol_*`` name or a malformed row is a ConfigError."""
    if not (isinstance(row, (list, tuple)) and len(row) > 2 and isinstance(row[2], str)):
        return False
    name = row[2]
    if name.lower().startswith(CUSTOM_NAME) and name not in BACKBONE_NAMES and name != LAYER_NAME:
        raise ConfigError(
            f"unknown RevCol backbone {name!r} in model YAML; known: {', '.join(sorted(BACKBONE_NAMES))} "
            f"({CUSTOM_NAME!r} takes a custom configuration)"
        )
    if name in BACKBONE_NAMES and len(row) != 4:
        raise ConfigError(
            f"a RevCol backbone row has four items, [from, repeats, module, args], e.g. [-1, 1, {name}, []]; "
            f"got {len(row)}: {list(row)}"
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
    layout = LAYOUT_TEXT
    for i, row in enumerate(rows[BACKBONE_LAYERS:], start=BACKBONE_LAYERS):
        for source in row[0] if isinstance(row[0], list) else [row[0]]:
            if not isinstance(source, int) or not -i <= source < i:
                raise ConfigError(f"layer {i} {row} takes input from layer {source}, which does not exist. {layout}")
            if source % i == 0 and row[2] != "Index":
                raise ConfigError(f"layer {i} {row} takes the backbone's list output (layer 0); use 1-4. {layout}")
