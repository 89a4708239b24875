"""What the sections return (typed results), and the report's summary table, machine line and plot."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

import revcol
from benchmarks.harness import Config

MODES = ("plain", "ckpt", "rev")


@dataclass
class Summary:
    """One row of the report's summary table; ``met`` is None for information rows."""

    metric: str
    goal: str
    measured: str
    met: bool | None


@dataclass
class SectionResult:
    """What a section reports: its Markdown lines and its rows of the summary table."""

    lines: list[str]
    summaries: list[Summary] = field(default_factory=list)


@dataclass
class ScalingPoint:
    """One point of the scaling section: step seconds and MB saved for backward, by mode (``MODES``)."""

    time: dict[str, float]
    mem: dict[str, float]


@dataclass
class ScalingResult(SectionResult):
    """The scaling section's report and the plot's data: points by input side and by column count."""

    by_size: dict[int, ScalingPoint] = field(default_factory=dict)
    by_columns: dict[int, ScalingPoint] = field(default_factory=dict)


@dataclass
class MemoryResult(SectionResult):
    """The memory section's report and its numbers: (activation MB, with parameters MB), by columns and mode."""

    saved: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def summary_table(rows: list[Summary]) -> list[str]:
    lines = ["| metric | goal | measured | met |", "|---|---|---|---|"]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.metric} | {row.goal} | {row.measured} | {met} |")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads ({cores} CPU cores visible), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, revcol {revcol.__version__}"
    )


def scaling_title(cfg: Config) -> str:
    return (
        f"RevCol training step, {cfg.name} ({cfg.columns} columns unless varied, {cfg.size}px unless varied), "
        f"batch {cfg.scale_batch}, {torch.get_num_threads()} CPU threads"
    )


def plot(scaling: ScalingResult, path: Path, title: str) -> None:
    """PNG of the scaling section: step time and saved memory vs input size and vs columns."""
    import matplotlib  # only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(9, 5), dpi=100)
    styles = {"plain": ("plain autograd", "o-"), "ckpt": ("checkpoint per column", "s--"), "rev": ("reversible", "^-")}
    panels = [
        (axes[0, 0], scaling.by_size, "time", "step time vs input size", "s / step"),
        (axes[1, 0], scaling.by_size, "mem", "saved memory vs input size", "MB saved (log)"),
        (axes[0, 1], scaling.by_columns, "time", "step time vs columns", "s / step"),
        (axes[1, 1], scaling.by_columns, "mem", "saved memory vs columns", "MB saved (log)"),
    ]
    for ax, points, what, panel_title, ylabel in panels:
        keys = sorted(points)
        for mode, (label, style) in styles.items():
            ax.plot(keys, [getattr(points[k], what)[mode] for k in keys], style, label=label, markersize=4)
        ax.set_title(panel_title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks(keys)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if what == "mem":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("input side (px)" if points is scaling.by_size else "columns", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
