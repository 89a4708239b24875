"""The ``revcol`` command: Ultralytics' ``yolo`` command with the RevCol backbones registered, plus extras.

    revcol train|val|predict|export|track|benchmark key=value ...   exactly as ``yolo <mode> key=value ...``
    revcol demo [--output DIR] [--epochs N] [--imgsz N] [--device D] ...
    revcol info [VARIANT | MODEL.yaml] [--imgsz N]
    revcol download VARIANT [TAG]
    revcol help | --help | version

Everything that is not one of our commands (``demo``, ``info``, ``download``, ``help``, ``version``) goes to
Ultralytics' own CLI entry point after ``import revcol``, so arguments, outputs, ``runs/`` folders,
progress bars and error messages are Ultralytics' own. Errors a user can cause (bad arguments, a
wrong model YAML, a missing file) are printed without a traceback: exit status 2 for a malformed
command line, 1 otherwise; set ``REVCOL_TRACEBACK=1`` to see the traceback."""

from __future__ import annotations

import os
from collections.abc import Sequence

from revcol.errors import RevColError


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


def variant_table(names: Sequence[str], imgsz: int) -> str:
    """A text table of the variants ``names``: channels, depths, columns, parameters and GFLOPs at ``imgsz``."""
    from revcol.core.variants import VARIANTS

    rows = []
    for name in names:
        spec = VARIANTS[name]
        params, flops = count_variant(name, imgsz)
        channels, depths = "-".join(map(str, spec.channels)), "-".join(map(str, spec.layers))
        rows.append((name, channels, depths, str(spec.num_subnet), f"{params / 1e6:.1f}", f"{flops / 1e9:.1f}"))
    header = ("variant", "channels", "depths", "columns", "params (M)", f"GFLOPs @{imgsz}")
    note = "GFLOPs: backbone only, 2 x multiply-accumulates (Ultralytics' convention; the paper's FLOPs are half that)."
    return _text_table(header, rows, note)


def weights_table(names: Sequence[str], statuses: dict | None = None) -> str:
    """Text tables of the authors' published weights of the variants ``names`` (ImageNet, then the backbones of
    their COCO and ADE20K models), and whether each is cached (checked: a file that does not load is "damaged")."""
    from revcol import weights

    entries = [entry for name in names for entry in weights.WEIGHTS.get(name, {}).values()]
    if not entries:
        return "No published weights for " + ", ".join(names) + "."
    statuses = statuses if statuses is not None else {entry: cache_status(entry) for entry in entries}
    rows = [
        (
            entry.variant,
            entry.tag + (" *" if weights.DEFAULT_TAGS.get(entry.variant) == entry.tag else ""),
            entry.filename,
            str(entry.resolution),
            "-" if entry.top1 is None else f"{entry.top1:.1f}",
            "-" if entry.num_classes is None else str(entry.num_classes),
            statuses[entry][0],
        )
        for entry in entries
        if not entry.is_downstream
    ]
    header = ("variant", "tag", "file", "resolution", "top-1", "classes", "cached")
    note = (
        "* the default of pretrained=True. top-1: ImageNet-1k at that resolution; - where none is published.\n"
        f"Cache: {weights.cache_dir()} (torch's hub cache; `revcol download VARIANT [TAG]` fills it)"
    )
    tables = [_text_table(header, rows, note)] if rows else []
    downstream = [
        (
            entry.variant,
            entry.tag,
            entry.filename,
            entry.trained_for.split(" (")[0],
            ", ".join(f"{name} {value:.1f}" for name, value in entry.scores) or "-",
            str(entry.kernel_size),
            statuses[entry][0],
        )
        for entry in entries
        if entry.is_downstream
    ]
    if downstream:
        header = ("variant", "tag", "file", "trained for", "published results", "kernel", "cached")
        note = "The backbones of the authors' COCO and ADE20K models: pretrained=TAG loads the backbone only."
        tables.append(_text_table(header, downstream, note))
    return "\n\n".join(tables)


def configs_table() -> str:
    """A text table of the model configs shipped with revcol: their head, the layers it reads, their backbone."""
    import yaml

    from revcol.ultralytics.yaml_rows import CONFIG_DIR, shipped_configs

    rows = []
    for name in shipped_configs():
        d = yaml.safe_load((CONFIG_DIR / name).read_text())
        source, _, head, _ = d["head"][-1]
        reads = ",".join(map(str, source)) if isinstance(source, list) else str(source)
        rows.append((name, head, reads, d["backbone"][0][2]))
    header = ("config", "head", "reads layers", "backbone")
    note = (
        "Load by bare name (e.g. YOLO('yolo-revcol-sem.yaml')); layers 1-4 are the backbone's strides 4, 8, 16, 32.\n"
        "SemanticSegment needs ultralytics>=8.4.52, Depth ultralytics>=8.4.104."
    )
    return _text_table(header, rows, note)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], note: str) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    lines = [line(row) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, note])


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
