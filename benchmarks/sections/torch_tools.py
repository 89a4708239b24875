"""Sections ``compile`` and ``profile``: what torch's own tools report about the model."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from benchmarks.harness import TINY, Config, eval_models, no_grad_forward, train_step
from benchmarks.report import SectionResult, Summary
from revcol import FullNet

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")


def section_compile(cfg: Config) -> SectionResult:
    tiny = FullNet(**TINY.spec.fullnet_kwargs()).eval()
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():  # the inference path, the one a compiled eval model runs
            explanation = torch._dynamo.explain(tiny)(x)
    except Exception as error:  # report, do not fail the benchmark
        return SectionResult(
            [f"torch._dynamo.explain failed: {type(error).__name__}: {error}"],
            [Summary("torch.compile: eval graph breaks", "0", "explain failed", False)],
        )
    finally:
        torch._dynamo.reset()
    reasons = sorted({str(getattr(b, "reason", b)).splitlines()[0] for b in explanation.break_reasons})
    lines = [
        f"`torch._dynamo.explain` on a tiny eval model: {explanation.graph_count} graph(s), "
        f"{explanation.graph_break_count} graph break(s)." + ("" if not reasons else " Reasons: " + "; ".join(reasons))
    ]
    return SectionResult(
        lines,
        [
            Summary(
                "torch.compile: eval graph breaks (tiny config)",
                "0",
                str(explanation.graph_break_count),
                explanation.graph_break_count == 0,
            )
        ],
    )


def matmul_share(fn: Callable[[], object]) -> float:
    """Fraction of ``fn``'s CPU time (sum of self times) spent in matrix-multiplication kernels."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def section_profile(cfg: Config) -> SectionResult:
    ours, base = eval_models(cfg)
    x_train = torch.randn(cfg.batch, 3, cfg.size, cfg.size)
    x_eval = torch.randn(1, 3, cfg.size, cfg.size)
    rows = [
        ("reversible training step", lambda model: functools.partial(train_step, model.train(), x_train, "rev")),
        ("plain training step", lambda model: functools.partial(train_step, model.train(), x_train, "plain")),
        ("eval forward (batch 1)", lambda model: functools.partial(no_grad_forward, model.eval(), x_eval)),
    ]
    lines = [
        f"Share of CPU time in matrix multiplications ({', '.join(f'`{op}`' for op in MATMUL_OPS)}; "
        f"`torch.profiler`, one run after a warm-up), {cfg.name}, {cfg.size}x{cfg.size}:",
        "",
        "| workload | ours | baseline |",
        "|---|---|---|",
    ]
    for name, make in rows:
        lines.append(f"| {name} | {matmul_share(make(ours)):.0%} | {matmul_share(make(base)):.0%} |")
    return SectionResult(lines)
