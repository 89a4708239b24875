"""Section ``cuda``: training-step time and peak memory on a GPU, plain against reversible (information only)."""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.harness import MB, Config, build, train_step
from benchmarks.report import SectionResult, Summary


@dataclass
class StepStats:
    """Median seconds of a training step, and peak MB allocated over the steps (NaN off CUDA)."""

    seconds: float
    peak_mb: float


@dataclass
class DeviceSteps:
    """``device_steps``' table, and its numbers by (mode, precision)."""

    lines: list[str]
    results: dict[tuple[str, str], StepStats]


def section_cuda(cfg: Config) -> SectionResult:
    if not torch.cuda.is_available():
        return SectionResult(["CUDA: skipped (no GPU available)."])
    steps = device_steps(cfg, torch.device("cuda"))
    summaries = []
    for precision in ("fp32", "fp16 autocast"):
        plain, rev = steps.results.get(("plain", precision)), steps.results.get(("rev", precision))
        if plain and rev:
            summaries.append(
                Summary(
                    f"CUDA {cfg.cuda_size}x{cfg.cuda_size} batch {cfg.cuda_batch} {precision}: rev / plain (info)",
                    "-",
                    f"time {rev.seconds / plain.seconds:.2f}x, peak memory {rev.peak_mb / plain.peak_mb:.2f}x",
                    None,
                )
            )
    return SectionResult(steps.lines, summaries)


def device_steps(cfg: Config, device: torch.device) -> DeviceSteps:
    """Training-step time and peak memory, plain vs reversible, fp32 and under autocast, on ``device``.

    Meant for CUDA (fp16 autocast, ``torch.cuda.max_memory_allocated``); on the CPU (the smoke test runs it
    there) it uses bfloat16 autocast and reports no peak.
    """
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    label = torch.cuda.get_device_name(device) if cuda else "CPU"
    lines = [
        f"{label}, {cfg.name}, {cfg.columns} columns, {cfg.cuda_size}x{cfg.cuda_size}, batch {cfg.cuda_batch}; "
        "peak = `torch.cuda.max_memory_allocated` over the timed steps (parameters and gradients included); "
        f"median of {cfg.repeats} steps:",
        "",
        "| mode | precision | step s | peak MB |",
        "|---|---|---|---|",
    ]
    results: dict[tuple[str, str], StepStats] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    x = torch.randn(cfg.cuda_batch, 3, cfg.cuda_size, cfg.cuda_size, device=device)
    for mode in ("plain", "rev"):
        for amp in (False, True):
            precision = ("fp16 autocast" if cuda else "bf16 autocast") if amp else "fp32"
            torch.manual_seed(0)
            model = build(cfg).to(device)

            def step(model=model, mode=mode, amp=amp):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    train_step(model, x, mode)

            try:
                step()  # warm-up (cuDNN autotuning, allocator)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(cfg.repeats):
                    start = time.perf_counter()
                    step()
                    sync()
                    times.append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated(device) / MB if cuda else math.nan
                results[mode, precision] = StepStats(statistics.median(times), peak)
                peak_cell = f"{peak:.0f}" if cuda else "n/a"
                lines.append(f"| {mode} | {precision} | {statistics.median(times):.3f} | {peak_cell} |")
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {mode} | {precision} | out of memory | - |")
            del model, step
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return DeviceSteps(lines, results)
