"""Section ``scaling``: step time and saved memory against input size and column count (the plot's data)."""

from __future__ import annotations

import functools
import gc

import torch

from benchmarks.harness import Config, build, interleaved, saved_mb, train_step
from benchmarks.report import MODES, ScalingPoint, ScalingResult


def section_scaling(cfg: Config) -> ScalingResult:
    modes = MODES
    result = ScalingResult([])
    result.lines += [
        f"Training step time (s) and saved MB (activations) vs input size ({cfg.columns} columns) and vs columns "
        f"({cfg.size}x{cfg.size}); batch {cfg.scale_batch}, median of {cfg.scale_repeats}:",
        "",
        "| point | plain s | ckpt s | rev s | plain MB | ckpt MB | rev MB |",
        "|---|---|---|---|---|---|---|",
    ]
    points = [("size", s, cfg.columns, s) for s in cfg.scale_sizes]
    points += [("columns", c, c, cfg.size) for c in cfg.scale_columns]
    for axis, key, columns, size in points:
        model = build(cfg, columns=columns)
        x = torch.randn(cfg.scale_batch, 3, size, size)
        mem = {mode: saved_mb(model, x, mode)[0] for mode in modes}
        # saved_mb just ran one step of each mode: that is the warm-up
        t = interleaved(
            {mode: functools.partial(train_step, model, x, mode) for mode in modes}, cfg.scale_repeats, warmup=0
        )
        points = result.by_size if axis == "size" else result.by_columns
        points[key] = ScalingPoint(t, mem)
        label = f"{size}x{size}" if axis == "size" else f"{columns} columns"
        result.lines.append(
            f"| {label} | "
            + " | ".join(f"{t[m]:.3f}" for m in modes)
            + " | "
            + " | ".join(f"{mem[m]:.1f}" for m in modes)
            + " |"
        )
        del model
        gc.collect()
    return result
