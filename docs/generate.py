"""Write the tables of README.md and docs/*.md from the data they show, so that no page restates a fact by hand.

A generated block is the lines between a start marker and an end marker, each on a line of its own:

    <!-- generated: NAME [ARGUMENT ...] -->
    ...written by this script...
    <!-- end generated -->

NAME is one of ``BLOCKS``. Run from anywhere:

    python docs/generate.py          rewrite the blocks of every page that drifted from the data
    python docs/generate.py --check  change nothing; exit 1 naming each page that drifted, 0 otherwise
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from revcol.cli import info
from revcol.core.variants import VARIANTS
from revcol.factory import DEFAULT_KERNEL_SIZE, build_variant
from revcol.ultralytics import yaml_rows
from revcol.weights import WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"^<!-- generated: ([a-z0-9-]+)((?: [^ ]+)*) -->$")
END = "<!-- end generated -->"
GIB = 2**30
HUGE_RANKS = (1, 2, 4, 8, 16, 32, 64)
IMGSZ = 224  # of the GFLOPs column: the variants' ImageNet resolution
BENCHMARKS = ROOT / "benchmarks"  # the data pages are generated from, wherever the pages are written
MEMORY_RESULTS = BENCHMARKS / "results-memory.md"


def pages(root: Path | None = None) -> list[Path]:
    """The pages whose blocks are generated: the README and every Markdown page under docs/ (of ``ROOT``)."""
    root = root or ROOT
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def variants() -> str:
    """The variants table, as ``revcol info`` prints it."""
    return info.variant_table(list(VARIANTS), IMGSZ, markdown=True)


def weights(*names: str) -> str:
    """The ImageNet weights of ``names`` (default: every variant), as ``revcol info`` prints them."""
    return info.weights_table(names or list(VARIANTS), markdown=True, downstream=False)


def downstream(*names: str) -> str:
    """The COCO and ADE20K backbones of ``names`` (default: every variant), as ``revcol info`` prints them."""
    return info.weights_table(names or list(VARIANTS), markdown=True, downstream=True)


def downstream_summary() -> str:
    """Per variant, the tags of its COCO and ADE20K backbones, each with its first published score."""
    rows = []
    for variant, entries in WEIGHTS.items():
        cells = []
        for folder in ("detection", "segmentation"):
            tags = [_scored_tag(e) for e in entries.values() if e.folder == folder]
            cells.append(", ".join(tags) or info.NO_VALUE)
        if cells != [info.NO_VALUE] * 2:
            rows.append([variant, *cells])
    return info.markdown_table(["variant", "COCO backbone tags", "ADE20K backbone tags"], rows)


def _scored_tag(entry) -> str:
    if not entry.scores:
        return f"`{entry.tag}` (pretraining only)"
    size = entry.kernel_size
    kernel = f"; {size}x{size} kernels" if size != DEFAULT_KERNEL_SIZE else ""
    score, value = entry.scores[0]
    return f"`{entry.tag}` ({score} {value:.1f}{kernel})"


def configs() -> str:
    """The shipped configs, as ``revcol info`` prints them."""
    return info.configs_table(markdown=True)


def layout() -> str:
    """The layers a RevCol row expands into, as ``revcol info`` prints them."""
    return info.layout_table(markdown=True)


def options() -> str:
    """The options a RevCol row takes, as ``revcol info`` prints them."""
    return info.options_table(markdown=True)


def release_table() -> str:
    """The heads newer than some supported Ultralytics releases, and the release each needs, as ``revcol info``
    prints them."""
    return info.releases_table(markdown=True)


def config(name: str) -> str:
    """A shipped config as it ships, for a page that shows one."""
    return "```yaml\n" + (yaml_rows.CONFIG_DIR / name).read_text().rstrip("\n") + "\n```"


def requirements() -> str:
    """The dependencies of pyproject.toml (through the installed metadata), lower bounds first."""
    python = importlib.metadata.metadata("revcol")["Requires-Python"]
    pinned = []
    for requirement in importlib.metadata.requires("revcol") or []:
        if "extra ==" in requirement:
            continue
        name, specs = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement.strip()).groups()
        specs = ",".join(sorted(specs.split(","), key=lambda spec: not spec.startswith(">")))
        pinned.append(f"`{name}{specs}`")
    return f"Python `{python}`, " + ", ".join(pinned) + "."


def huge_per_rank() -> str:
    """RevCol-H's float32 parameters, gradients and AdamW moments per rank, and one gathered column."""
    with torch.device("meta"):  # counted on the network itself, with no memory
        net = build_variant("revcol_huge")
    params = sum(p.numel() for p in net.parameters())
    column = max(sum(p.numel() for p in subnet.parameters()) for subnet in net.subnets)
    rows = [[str(n), *(f"{b * params / n / GIB:.2f}" for b in (4, 4, 8, 16))] for n in HUGE_RANKS]
    table = info.markdown_table(["ranks", "parameters GiB", "gradients GiB", "AdamW state GiB", "total GiB"], rows)
    return (
        f"RevCol-H: {params:,} backbone parameters, at most {column:,} per column ({4 * column / GIB:.2f} GiB in "
        f"float32, {2 * column / GIB:.2f} GiB in bfloat16 with `mixed_precision=True`).\n\n{table}"
    )


def results(name: str) -> str:
    """The summary table of ``benchmarks/NAME`` (a report of ``python -m benchmarks.run``), its command and machine."""
    text = (BENCHMARKS / name).read_text()
    command = re.search(r"^Command: `(.*?)`", text, re.M).group(1)
    machine = re.search(r"^Machine: (.*?)\s*$", text, re.M).group(1)
    table = re.search(r"^\| metric \|.*?(?=\n\n)", text, re.M | re.S).group(0)
    return f"{table}\n\n`{command}`; {machine} (`benchmarks/{name}`)."


def memory() -> str:
    """The footprint tables of ``benchmarks/results-memory.md``: memory kept for backward and step time."""
    text = MEMORY_RESULTS.read_text()
    machine = re.search(r"^Machine: (.*?)\s*$", text, re.M).group(1)
    rows, medians = [], []
    for caption, repeats, table in re.findall(r"^(.*?); median of (\d+), interleaved:\n\n((?:\|.*\n)+)", text, re.M):
        size = "{}, batch {}".format(*re.search(r"(\d+x\d+), batch (\d+)", caption).groups())
        medians.append(repeats)
        for cells in [line.strip("|").split("|") for line in table.splitlines()[2:]]:
            model, _, seconds, time_ratio, kept, kept_ratio = (c.strip() for c in cells[:6])
            if time_ratio == "1.00x":  # the reference of its group
                rows.append([f"{model}: reference", f"{kept} MB", f"{time_ratio} ({float(seconds):.2f} s)"])
            else:
                rows.append([f"{model}, {size}", f"{kept} MB ({kept_ratio})", time_ratio])
    table = info.markdown_table(["training step", "kept for backward", "step time"], rows)
    steps = " and ".join(medians)
    return f"{table}\n\nMedians of {steps} interleaved steps; {machine} (`benchmarks/results-memory.md`)."


def _signature(value: object) -> str:
    """``(a, b=1)`` of a function or class, without annotations (the docstring says what each is); ``""`` else."""
    if not callable(value):
        return ""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return "(...)"
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    text = str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))
    return re.sub(r" at 0x[0-9a-f]+>", ">", text)  # a default's address differs between runs


def _summary(value: object) -> str:
    """The first paragraph of ``value``'s own docstring on one line; a constant is described by its value."""
    if callable(value):
        return " ".join((inspect.getdoc(value) or "").split("\n\n")[0].split())
    if isinstance(value, (str, int, float)) and len(repr(value)) <= 80:
        return f"`{value!r}`"
    if isinstance(value, (dict, tuple, list, frozenset, set)):
        items = ", ".join(map(str, value))
        return f"{type(value).__name__} of {len(value)}: " + (items if len(items) <= 100 else items[:97] + "...")
    return type(value).__name__


def api(module_name: str) -> str:
    """The public names of ``module_name`` (its ``__all__``), each with its signature and docstring summary."""
    module = importlib.import_module(module_name)
    rows = []
    for name in module.__all__:
        value = getattr(module, name)
        cells = [f"`{name}{_signature(value)}`", _summary(value)]
        rows.append([cell.replace("|", "\\|") for cell in cells])
    return info.markdown_table(["name", "what it is"], rows)


BLOCKS: dict[str, Callable[..., str]] = {
    "variants": variants,
    "weights": weights,
    "downstream": downstream,
    "downstream-summary": downstream_summary,
    "configs": configs,
    "layout": layout,
    "options": options,
    "releases": release_table,
    "config": config,
    "requirements": requirements,
    "huge-per-rank": huge_per_rank,
    "memory": memory,
    "results": results,
    "api": api,
}


def regenerate(text: str, page: str = "page") -> str:
    """``text`` with every generated block rewritten; ``ValueError`` naming the line for a malformed block."""
    out, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        match = START.match(line.rstrip("\n"))
        if match is None:
            continue
        name, args = match.group(1), match.group(2).split()
        if name not in BLOCKS:
            raise ValueError(f"{page}:{i}: unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        end = next((j for j in range(i, len(lines)) if lines[j].rstrip("\n") == END), None)
        if end is None or any(START.match(lines[j].rstrip("\n")) for j in range(i, end)):
            raise ValueError(f"{page}:{i}: block {name!r} has no {END!r} before the next block or the end")
        out.append("\n" + BLOCKS[name](*args).strip("\n") + "\n\n")
        i = end
    return "".join(out)


def drifted(root: Path | None = None, write: bool = False) -> list[Path]:
    """The pages under ``root`` (``ROOT``) whose generated blocks differ from the data; ``write``: rewrite them."""
    root = root or ROOT
    changed = []
    for page in pages(root):
        text = page.read_text()
        new = regenerate(text, str(page.relative_to(root)))
        if new != text:
            changed.append(page)
            if write:
                page.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python docs/generate.py [--check]``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page drifted")
    check = parser.parse_args(argv).check
    changed = drifted(write=not check)
    for page in changed:
        verb = "drifted from the data (run python docs/generate.py)" if check else "rewritten"
        print(f"{page.relative_to(ROOT)}: {verb}", file=sys.stderr if check else sys.stdout)
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
