"""Sections ``construction``, ``train`` and ``eval``: ours against the baseline, timed interleaved."""

from __future__ import annotations

import functools
import statistics

import torch

from benchmarks.baseline import BaselineFullNet
from benchmarks.harness import GOALS, Config, build, eval_models, interleaved, max_rel_err, no_grad_forward, train_step
from benchmarks.report import SectionResult, Summary, fmt_ratio
from revcol import FullNet


def section_construction(cfg: Config) -> SectionResult:
    def ours():
        FullNet(cfg.channels, cfg.layers, cfg.columns, drop_path=cfg.drop_path)

    def base():
        BaselineFullNet(cfg.channels, cfg.layers, cfg.columns, drop_path=cfg.drop_path)

    t = interleaved({"ours": ours, "baseline": base}, cfg.repeats if cfg.smoke else max(cfg.repeats, 5), cfg.warmup)
    goal = GOALS["construct_vs_baseline"]
    ratio = t["baseline"] / t["ours"]
    lines = [
        "| build (no forward) | median s |",
        "|---|---|",
        f"| ours | {t['ours']:.3f} |",
        f"| baseline (default module init + trunc_normal_) | {t['baseline']:.3f} |",
    ]
    return SectionResult(
        lines,
        [
            Summary(
                f"construction ({cfg.name}, {cfg.columns} columns): baseline / ours",
                f">= {goal}x",
                f"{fmt_ratio(ratio)} ({t['ours']:.3f} s vs {t['baseline']:.3f} s)",
                ratio >= goal,
            )
        ],
    )


def section_train(cfg: Config) -> SectionResult:
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size)
    ours = build(cfg)
    base = build(cfg, "baseline")
    base.load_state_dict(ours.state_dict())
    splits: dict[str, list[tuple[float, float]]] = {"ours rev": [], "ours plain": []}
    fns = {
        "baseline rev": lambda: train_step(base, x, "rev"),
        "ours rev": lambda: train_step(ours, x, "rev", split=splits["ours rev"]),
        "ours plain": lambda: train_step(ours, x, "plain", split=splits["ours plain"]),
        "ours ckpt": lambda: train_step(ours, x, "ckpt"),
        "baseline plain": lambda: train_step(base, x, "plain"),
    }
    fastest: dict[str, float] = {}
    t = interleaved(fns, cfg.repeats, cfg.warmup, minima=fastest)
    speedup = t["baseline rev"] / t["ours rev"]
    overhead = t["ours rev"] / t["ours plain"]
    fwd = {name: statistics.median(f for f, _ in values) for name, values in splits.items()}
    bwd = {name: statistics.median(b for _, b in values) for name, values in splits.items()}
    # The reversible step runs the columns' forward twice (once without a graph, once in backward to
    # rebuild it), so it cannot take less than plain + one graph-free forward.
    bound = (fwd["ours rev"] + fwd["ours plain"] + bwd["ours plain"]) / (fwd["ours plain"] + bwd["ours plain"])
    lines = [
        f"Training step (zero_grad + forward + backward), {cfg.name}, {cfg.columns} columns, {cfg.size}x{cfg.size}, "
        f"batch {cfg.batch}, drop-path {cfg.drop_path}; median of {cfg.repeats}:",
        "",
        "| implementation | median s | vs ours plain | fastest s | fastest vs ours plain |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {value:.3f} | {value / t['ours plain']:.2f}x | {fastest[name]:.3f} "
            f"| {fastest[name] / fastest['ours plain']:.2f}x |"
            for name, value in t.items()
        ),
        "",
        f"Split (medians): ours plain forward {fwd['ours plain']:.3f} s + backward {bwd['ours plain']:.3f} s; "
        f"ours reversible forward (no graph) {fwd['ours rev']:.3f} s + backward (recompute + backward) "
        f"{bwd['ours rev']:.3f} s. A reversible step computes every column's forward twice, so "
        f"rev / plain >= (F_rev + F_plain + B_plain) / (F_plain + B_plain) = {bound:.2f}x on these numbers.",
    ]
    goal = GOALS["train_vs_baseline"]
    summaries = [
        Summary(
            "train step: baseline rev / ours rev",
            f">= {goal}x",
            f"{fmt_ratio(speedup)} (fastest runs: {fmt_ratio(fastest['baseline rev'] / fastest['ours rev'])})",
            speedup >= goal,
        ),
        Summary(
            "train step: ours rev / ours plain (info)",
            "-",
            f"{fmt_ratio(overhead)} (fastest runs: {fmt_ratio(fastest['ours rev'] / fastest['ours plain'])}; "
            f"bound {fmt_ratio(bound)})",
            None,
        ),
        Summary("train step: ours ckpt / ours plain (info)", "-", fmt_ratio(t["ours ckpt"] / t["ours plain"]), None),
    ]
    return SectionResult(lines, summaries)


def section_eval(cfg: Config) -> SectionResult:
    ours, base = eval_models(cfg)
    compiled = "ours torch.compile" if cfg.compile_eval else None
    lines = [
        f"Eval forward (`torch.no_grad`), batch 1, {cfg.name}, {cfg.columns} columns, both models with the same "
        f"weights, timed interleaved in this process; median of {cfg.repeats}"
        + (
            "; `torch.compile(dynamic=False)` (inductor, compiled once per input size, outside the timing) "
            "of our eval model as extra information"
            if compiled
            else ""
        )
        + ":",
        "",
        "| input | baseline s | ours s | speed-up | fastest runs | max rel. output difference |"
        + (" torch.compile s | compiled speed-up | compiled output difference |" if compiled else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if compiled else ""),
    ]
    goal, match = GOALS["eval_vs_baseline"], GOALS["eval_match"]
    summaries = []
    for size in cfg.eval_sizes:
        x = torch.randn(1, 3, size, size)
        reference = no_grad_forward(ours, x)
        diff = max_rel_err(reference, no_grad_forward(base, x))
        fns = {
            "baseline": functools.partial(no_grad_forward, base, x),
            "ours": functools.partial(no_grad_forward, ours, x),
        }
        tail = ""
        if compiled:
            try:
                torch._dynamo.reset()
                fns[compiled] = functools.partial(no_grad_forward, torch.compile(ours, dynamic=False), x)
                compiled_diff = max_rel_err(fns[compiled](), reference)
            except Exception as error:  # no C++ compiler, unsupported platform...: report, carry on
                fns.pop(compiled, None)
                tail = f" compile failed: {type(error).__name__} | - | - |"
        fastest: dict[str, float] = {}
        t = interleaved(fns, cfg.repeats, cfg.warmup, minima=fastest)
        if compiled in t:
            tail = f" {t[compiled]:.3f} | {t['baseline'] / t[compiled]:.2f}x | {compiled_diff:.1e} |"
        speedup = t["baseline"] / t["ours"]
        lines.append(
            f"| {size}x{size} | {t['baseline']:.3f} | {t['ours']:.3f} | {speedup:.2f}x "
            f"| {fastest['baseline'] / fastest['ours']:.2f}x | {diff:.1e} |" + tail
        )
        summaries.append(
            Summary(
                f"eval {size}x{size}: baseline / ours, eager (outputs match)",
                f">= {goal}x, output difference <= {match:.0e}",
                f"{fmt_ratio(speedup)}, {diff:.1e}",
                speedup >= goal and diff <= match,
            )
        )
    torch._dynamo.reset()
    return SectionResult(lines, summaries)
