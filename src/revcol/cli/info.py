"""The tables of ``revcol info``: the variants, the authors' published weights, the shipped configs, the layers
and options of a RevCol row, and the Ultralytics releases the heads need.

Each table is printed from the data it shows (``revcol.core.variants``, ``revcol.weights.published``, the
configs folder, ``revcol.ultralytics.yaml_rows`` and ``.releases``); ``markdown=True`` gives the same table as
Markdown, which is how ``docs/generate.py`` writes the tables of the README and the docs."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

from revcol.errors import RevColError

NO_VALUE = "-"  # a cell with nothing published


def _published_of(name: str) -> list:
    from revcol import weights

    return list(weights.WEIGHTS.get(name, {}).values())


def cache_status(entry) -> tuple[str, str | None]:
    """("yes", None) for a cached checkpoint that loads into ``entry``'s variant, ("no", None) when nothing is
    cached, ("damaged", why) for a file (or anything else) under its name that does not."""
    from revcol import weights
    from revcol.weights.pretrained import check_published

    if not os.path.lexists(weights.cache_path(entry)):
        return "no", None
    try:
        check_published(entry)
    except RevColError as error:
        return "damaged", str(error)
    return "yes", None


def variant_table(names: Sequence[str], imgsz: int, markdown: bool = False) -> str:
    """A table of the variants ``names``: channels, depths, columns, parameters and GFLOPs at ``imgsz``.

    ``markdown``: as Markdown, with each variant's drop-path rate too.
    """
    from revcol.core.variants import VARIANTS

    rows = []
    for name in names:
        spec = VARIANTS[name]
        params, flops = count_variant(name, imgsz)
        cells = [_code(name, markdown), _dashed(spec.channels), _dashed(spec.layers), str(spec.num_subnet)]
        cells += [f"{spec.drop_path:g}"] if markdown else []
        rows.append([*cells, f"{params / 1e6:.1f}", f"{flops / 1e9:.1f}"])
    header = ["variant", "channels", "depths", "columns", *(["drop path"] if markdown else []), "params (M)"]
    header.append(f"GFLOPs @{imgsz}")
    notes = [
        "GFLOPs: backbone only, 2 x multiply-accumulates (Ultralytics' convention; the paper's FLOPs are half that)."
    ]
    wired = [_code(name, markdown) for name in names if VARIANTS[name].level0_from_coarsest]
    if wired:
        notes.append(f"Level 0 also reads level 3 (level0_from_coarsest) in {', '.join(wired)}.")
    return _table(header, rows, notes, markdown)


def weights_table(
    names: Sequence[str], statuses: dict | None = None, markdown: bool = False, downstream: bool | None = None
) -> str:
    """Tables of the authors' published weights of the variants ``names`` (ImageNet, then the backbones of their
    COCO and ADE20K models), and whether each is cached (checked: a file that does not load is "damaged").

    ``markdown``: the same tables as Markdown, without the cache (a property of this machine, not of the files).
    ``downstream``: ``False`` for the ImageNet table only, ``True`` for the COCO and ADE20K one only.
    """
    from revcol import weights

    entries = [entry for name in names for entry in weights.WEIGHTS.get(name, {}).values()]
    entries = [entry for entry in entries if downstream in (None, entry.is_downstream)]
    if not entries:
        return "No published weights for " + ", ".join(names) + "."
    if not markdown and statuses is None:
        statuses = {entry: cache_status(entry) for entry in entries}
    cached = [] if markdown else ["cached"]

    def row(entry, cells) -> list[str]:
        return [*cells(entry, markdown), *([] if markdown else [statuses[entry][0]])]

    tables = []
    classifiers = [row(entry, _classifier_cells) for entry in entries if not entry.is_downstream]
    if classifiers:
        header = ["variant", "tag", "file", "resolution", "top-1", "classes", *cached]
        tables.append(_table(header, classifiers, _classifier_notes(names, markdown), markdown))
    backbones = [row(entry, _downstream_cells) for entry in entries if entry.is_downstream]
    if backbones:
        header = ["variant", "tag", "file", "trained for", "published results", "kernel", *cached]
        note = "The backbones of the authors' COCO and ADE20K models: pretrained=TAG loads the backbone only."
        tables.append(_table(header, backbones, [note], markdown))
    return "\n\n".join(tables)


def _classifier_notes(names: Sequence[str], markdown: bool) -> list[str]:
    from revcol import weights

    scores = f"top-1: ImageNet-1k at that resolution; {NO_VALUE} where none is published."
    if not markdown:
        cache = f"Cache: {weights.cache_dir()} (torch's hub cache; `revcol download VARIANT [TAG]` fills it)"
        return [f"* the default of pretrained=True. {scores}", cache]
    unpublished = [_code(name, True) for name in names if name not in weights.WEIGHTS]
    notes = [f"(default): what `pretrained=True` loads. {scores}"]
    return notes + ([f"No published file: {', '.join(unpublished)}."] if unpublished else [])


def _classifier_cells(entry, markdown: bool) -> list[str]:
    from revcol import weights

    default = weights.DEFAULT_TAGS.get(entry.variant) == entry.tag
    tag = _code(entry.tag, markdown) + ((" (default)" if markdown else " *") if default else "")
    where = " (mirror only)" if markdown and not entry.in_release else ""
    top1 = f"{entry.top1:.1f}" if entry.top1 is not None else NO_VALUE
    if markdown and entry.top1 is None:
        top1 += f" ({entry.trained_for})"
    classes = NO_VALUE if entry.num_classes is None else str(entry.num_classes)
    return [entry.variant, tag, _code(entry.filename, markdown) + where, str(entry.resolution), top1, classes]


def _downstream_cells(entry, markdown: bool) -> list[str]:
    scores = ", ".join(f"{name} {value:.1f}" for name, value in entry.scores) or NO_VALUE
    filename = _code(entry.filename, markdown) + (f" ({entry.folder})" if markdown else "")
    trained_for = entry.trained_for if markdown else entry.trained_for.split(" (")[0]
    return [entry.variant, _code(entry.tag, markdown), filename, trained_for, scores, str(entry.kernel_size)]


class ShippedConfig(NamedTuple):
    """What ``revcol info`` and ``revcol help`` show of a shipped config."""

    head: str
    reads: str  # the layers the head reads, comma-separated
    backbone: str
    description: str


@functools.cache  # the configs ship with the package and do not change while it runs
def shipped_config(name: str) -> ShippedConfig:
    """Shipped config ``name``: its head, the layers the head reads, its backbone, and its one-line description.

    The description is the file's first line, a ``# `` comment saying what the model is: the one place it is
    written. ``rtdetr-revcol.yaml`` has none (docs/design.md shows the file verbatim as the YAML contract's
    reference), so a config without one is described by its head and backbone.
    """
    import yaml

    from revcol.ultralytics.yaml_rows import CONFIG_DIR

    text = (CONFIG_DIR / name).read_text()
    d = yaml.safe_load(text)
    source, _, head, _ = d["head"][-1]
    reads = ",".join(map(str, source)) if isinstance(source, list) else str(source)
    backbone = d["backbone"][0][2]
    first = text.partition("\n")[0]
    if not first.startswith("# "):  # a packaging mistake: every shipped config opens with its description
        raise ValueError(f"shipped config {name} does not start with a '# description' line")
    return ShippedConfig(head, reads, backbone, first.removeprefix("# ").strip())


def configs_table(markdown: bool = False) -> str:
    """A table of the model configs shipped with revcol: their head, the layers it reads, their backbone, and what
    each model is."""
    from revcol.ultralytics.releases import HEADS_SINCE, head_release, supported_floor, supported_range
    from revcol.ultralytics.yaml_rows import LAYOUT, shipped_configs

    rows = []
    for name in shipped_configs():
        config = shipped_config(name)
        cells = [_code(name, markdown), _code(config.head, markdown), config.reads, _code(config.backbone, markdown)]
        rows.append([*cells, config.description])
    header = ["config", "head", "reads layers", "backbone", "description"]
    levels = LAYOUT[1:]
    strides = ", ".join(layer.output.split(" (")[0].removeprefix("stride ") for layer in levels)
    floor = supported_floor()
    needs = [f"{head} needs ultralytics>={head_release(head)}" for head in HEADS_SINCE if head_release(head) != floor]
    notes = [
        f"Load by bare name (e.g. YOLO('yolo-revcol-sem.yaml')); layers {levels[0].index}-{levels[-1].index} are "
        f"the backbone's strides {strides}.",
        *([", ".join(needs) + "."] if needs else []),
        f"{'Every other' if needs else 'Every'} head: every supported Ultralytics ({supported_range()}).",
    ]
    return _table(header, rows, notes, markdown, left=len(header))


def layout_table(markdown: bool = False) -> str:
    """The layers a RevCol row of a model YAML expands into: index, module, output."""
    from revcol.ultralytics.yaml_rows import LAYOUT

    header = ["index", "layer", "output"]
    rows = [[str(layer.index), _code(layer.module, markdown), layer.output] for layer in LAYOUT]
    return _table(header, rows, [], markdown, left=len(header))


def options_table(markdown: bool = False) -> str:
    """The options a RevCol row takes, the rows that take each, and what each means."""
    from revcol.ultralytics.yaml_rows import CUSTOM_NAME, OPTIONS, Option

    def set_on(option: Option) -> str:
        if not option.custom:
            return "every RevCol row"
        return f"custom {_code(CUSTOM_NAME, markdown)} rows" + (", required" if option.required else "")

    header = ["option", "set on", "meaning"]
    rows = [[_code(option.name, markdown), set_on(option), option.meaning] for option in OPTIONS]
    return _table(header, rows, [], markdown, left=len(header))


def releases_table(markdown: bool = False) -> str:
    """The heads that not every supported Ultralytics release has, the release that added each and the release a
    RevCol model with it needs; then every other head."""
    from revcol.ultralytics.releases import HEADS_SINCE, head_release, supported_range

    rows = [
        [_code(head, markdown), since, _code(f"ultralytics>={head_release(head)}", markdown)]
        for head, since in HEADS_SINCE.items()
    ]
    supported = _code(f"ultralytics{supported_range()}", markdown)
    rows.append(["every other head", NO_VALUE, f"{supported} (the supported range)"])
    header = ["head", "added in Ultralytics", "a RevCol model needs"]
    return _table(header, rows, [], markdown, left=len(header))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str], markdown: bool, left: int = 1
) -> str:
    """``left``: how many columns of the text table are left-aligned (words), the others right-aligned (numbers)."""
    if markdown:
        return "\n\n".join([markdown_table(header, rows), *([" ".join(notes)] if notes else [])])
    return "\n".join([_text_table(header, rows, left), *notes])


def _code(text: str, markdown: bool) -> str:
    return f"`{text}`" if markdown else text


def _dashed(values: Sequence[int]) -> str:
    return "-".join(map(str, values))


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> str:
    """Columns padded to their widest cell: the first ``left`` left-aligned, the others right-aligned."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    lines = [line(row) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@functools.cache  # a pure function of immutable data (VARIANTS), and ~0.6 s a call: the docs ask for each many times
def count_variant(name: str, imgsz: int) -> tuple[int, int]:
    """Parameters and FLOPs (2 x multiply-accumulates of convolutions and matmuls) of backbone ``name``.

    The network is built on the meta device, so nothing is allocated or computed, and even RevCol-XL is quick.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from revcol.factory import build_variant

    with torch.device("meta"):
        model = build_variant(name, save_memory=False).eval()
        x = torch.empty(1, 3, imgsz, imgsz)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return params, counter.get_total_flops()
