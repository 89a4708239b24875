"""Section ``memory``: bytes saved for backward, ours against the baseline, and that nothing leaks."""

from __future__ import annotations

import gc

import torch

from benchmarks.harness import MB, Config, StepRecorder, build, saved_mb, train_step
from benchmarks.report import MemoryResult, Summary


def section_memory(cfg: Config) -> MemoryResult:
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size)
    lines = [
        f"MB of tensors saved for backward by one training step ({cfg.name}, {cfg.size}x{cfg.size}, batch "
        f"{cfg.batch}; `saved_tensors_hooks`, deduplicated by storage; parameters excluded, in brackets "
        "the total with parameters that autograd saves):",
        "",
        "| columns | plain | checkpoint per column | reversible (ours) | reversible (baseline) |",
        "|---|---|---|---|---|",
    ]
    summaries = []
    data = {}
    for columns in cfg.memory_columns:
        model = build(cfg, columns=columns)
        base = build(cfg, "baseline", columns=columns)
        row = {mode: saved_mb(model, x, mode) for mode in ("plain", "ckpt", "rev")}
        row["baseline"] = saved_mb(base, x, "rev")
        data[columns] = row
        cells = [f"{a:.1f} ({t:.1f})" for a, t in row.values()]
        lines.append(f"| {columns} | " + " | ".join(cells) + " |")
        # activations only: the parameters are the same tensors in both models and exist anyway
        ours, baseline = row["rev"][0], row["baseline"][0]
        summaries.append(
            Summary(
                f"saved MB, reversible, {columns} columns: ours / baseline",
                "ours <= baseline",
                f"{ours:.2f} / {baseline:.2f} MB of activations (plain {row['plain'][0]:.0f})",
                ours <= baseline,
            )
        )
        del model, base
        gc.collect()

    # no leak: what each step saves, and what of it is still alive after the step
    model = build(cfg)
    saved, alive = [], []
    for _ in range(cfg.leak_steps):
        recorder = StepRecorder(model, keep=x)
        train_step(model, x, "rev", recorder)
        gc.collect()
        saved.append(recorder.activation_bytes / MB)
        alive.append(recorder.alive_bytes() / MB)
    flat = max(saved) - min(saved) < 0.01 and max(alive) < 0.01
    lines += [
        "",
        f"{cfg.leak_steps} consecutive reversible training steps ({cfg.columns} columns): saved MB per step "
        + ", ".join(f"{v:.2f}" for v in saved)
        + "; MB of those still alive after each step: "
        + ", ".join(f"{v:.2f}" for v in alive),
    ]
    summaries.append(
        Summary(
            f"saved MB flat over {cfg.leak_steps} steps (no leak)",
            "flat, 0 alive after step",
            f"{min(saved):.2f}-{max(saved):.2f} MB, {max(alive):.2f} MB alive",
            flat,
        )
    )
    return MemoryResult(lines, summaries, data)
