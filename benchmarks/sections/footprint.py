"""Section ``footprint``: the memory story in numbers, RevCol against the usual models of its class.

Two comparisons, each timed interleaved in this process, with the bytes a training step keeps for backward:

* ``revcol_tiny`` (timm, reversible and plain) against timm's ``convnext_tiny`` (the same ~4.5 GFLOPs class);
* a full RT-DETR training step (forward, loss with its denoising queries, backward) with the shipped
  ``rtdetr-revcol.yaml`` (RevCol-S, reversible and plain) against Ultralytics' ``rtdetr-resnet50.yaml``,
  at 640 px; both are built from YAML, with no weights.

"Kept for backward" is what ``saved_tensors_hooks`` see, deduplicated by storage, parameters excluded
(``harness.StepRecorder``). On CUDA the section also reports the peak of ``torch.cuda.max_memory_allocated``
over a step (parameters, gradients and workspace included) and images/s; on the CPU no peak is measurable.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from ultralytics.nn import tasks

import revcol
from benchmarks.harness import MB, Config, StepRecorder, interleaved
from benchmarks.report import SectionResult, Summary

DETECTION_YAMLS = {"RT-DETR RevCol-S": "rtdetr-revcol.yaml", "RT-DETR ResNet-50": "rtdetr-resnet50.yaml"}


def _recording(recorder: StepRecorder | None) -> contextlib.AbstractContextManager:
    return recorder.recording() if recorder is not None else contextlib.nullcontext()


def _classifier_step(
    model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, recorder: StepRecorder | None = None
) -> torch.Tensor:
    """One training step; ``recorder`` sees what forward and loss keep (backward's own recompute is not kept)."""
    model.zero_grad(set_to_none=True)
    with _recording(recorder):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    return loss


def _detection_batch(size: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Images and three boxes per image (normalised xywh), as Ultralytics' RT-DETR loss reads them."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.8, 0.4, 0.2]])
    return {
        "img": torch.rand(batch, 3, size, size, generator=generator).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(3).float().to(device),
        "cls": torch.tensor([0.0, 1.0, 2.0]).repeat(batch).view(-1, 1).to(device),
        "bboxes": boxes.repeat(batch, 1).to(device),
    }


def _detector(yaml: str) -> tasks.RTDETRDetectionModel:
    model = tasks.RTDETRDetectionModel(tasks.yaml_model_load(yaml), verbose=False)
    model.nc = model.yaml["nc"]  # what Ultralytics' trainer sets before the loss is first built
    return model


def _detection_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], recorder: StepRecorder | None = None
) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with _recording(recorder):
        loss, _ = model.loss(batch)
    loss.backward()
    return loss


def _kept_mb(model: torch.nn.Module, step: Callable[..., object]) -> float:
    """MB that one step's forward and loss keep for backward (parameters excluded)."""
    recorder = StepRecorder(model)
    step(recorder=recorder)
    return recorder.activation_bytes / MB


def _peak_mb(step: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / MB


def _timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return interleaved(fns, repeats, warmup)

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            fn()
            torch.cuda.synchronize(device)

        return run

    return interleaved({name: synced(fn) for name, fn in fns.items()}, repeats, warmup)


@dataclass
class Row:
    """One model of a comparison: parameters (M), MB kept for backward, peak MB (CUDA only), median step seconds."""

    params: float
    kept: float
    peak: float | None
    time: float = 0.0


def _measure(
    models: dict[str, torch.nn.Module],
    steps: dict[str, Callable[..., object]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Row]:
    """Each model's row: one recorded step, one peak-measured step, then all steps timed interleaved."""
    rows = {
        name: Row(sum(p.numel() for p in models[name].parameters()) / 1e6, _kept_mb(models[name], step),
                  _peak_mb(step, device))
        for name, step in steps.items()
    }  # fmt: skip
    for name, seconds in _timed(steps, repeats, warmup, device).items():
        rows[name].time = seconds
    return rows


def _table(title: str, rows: dict[str, Row], reference: str, batch: int) -> list[str]:
    lines = [
        title,
        "",
        f"| model | params M | step s | vs {reference} | kept for backward MB | vs {reference} | peak MB | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = rows[reference]
    for name, row in rows.items():
        peak = "n/a (CPU)" if row.peak is None else f"{row.peak:.0f}"
        lines.append(
            f"| {name} | {row.params:.1f} | {row.time:.3f} | {row.time / ref.time:.2f}x "
            f"| {row.kept:.0f} | {row.kept / ref.kept:.2f}x | {peak} | {batch / row.time:.3g} |"
        )
    return lines


def _versus(metric: str, rev: Row, plain: Row, ref: Row) -> Summary:
    """The information row of a comparison: RevCol reversible (and plain) against the reference model."""
    return Summary(
        metric,
        "-",
        f"{rev.kept:.0f} vs {ref.kept:.0f} MB ({rev.kept / ref.kept:.2f}x), {rev.time / ref.time:.2f}x time; "
        f"plain {plain.kept:.0f} MB, {plain.time / ref.time:.2f}x",
        None,
    )


def _classifiers(cfg: Config, device: torch.device) -> SectionResult:
    size, batch = cfg.footprint_size, cfg.footprint_batch
    torch.manual_seed(0)
    classifiers = {
        "revcol_tiny reversible": timm.create_model("revcol_tiny", save_memory=True),
        "revcol_tiny plain": timm.create_model("revcol_tiny", save_memory=False),
        "convnext_tiny (timm)": timm.create_model("convnext_tiny"),
    }
    classifiers["revcol_tiny plain"].load_state_dict(classifiers["revcol_tiny reversible"].state_dict())
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    steps = {}
    for name, model in classifiers.items():
        model.to(device).train()
        steps[name] = functools.partial(_classifier_step, model, x, labels)
    rows = _measure(classifiers, steps, cfg.repeats, cfg.warmup, device)
    reference = "convnext_tiny (timm)"
    lines = _table(
        f"Classifier training step (cross-entropy, forward + backward), {size}x{size}, batch {batch}, "
        f"{device.type}, drop-path as each model's default; median of {cfg.repeats}, interleaved:",
        rows,
        reference,
        batch,
    )
    metric = f"revcol_tiny rev vs convnext_tiny, {size}px batch {batch}: kept MB, step time (info)"
    return SectionResult(lines, [_versus(metric, rows["revcol_tiny reversible"], rows["revcol_tiny plain"],
                                         rows[reference])])  # fmt: skip


def _detectors(cfg: Config, device: torch.device) -> SectionResult:
    size, batch, repeats = cfg.detect_size, cfg.detect_batch, cfg.detect_repeats
    data = _detection_batch(size, batch, device)
    torch.manual_seed(0)
    built = {name: _detector(yaml).to(device).train() for name, yaml in DETECTION_YAMLS.items()}
    plain = _detector(DETECTION_YAMLS["RT-DETR RevCol-S"])
    plain.load_state_dict(built["RT-DETR RevCol-S"].state_dict())
    plain.model[0].save_memory = False
    detectors = {
        "RT-DETR RevCol-S reversible": built["RT-DETR RevCol-S"],
        "RT-DETR RevCol-S plain": plain.to(device).train(),
        "RT-DETR ResNet-50": built["RT-DETR ResNet-50"],
    }
    steps = {name: functools.partial(_detection_step, model, data) for name, model in detectors.items()}
    rows = _measure(detectors, steps, repeats, cfg.warmup, device)
    reference = "RT-DETR ResNet-50"
    lines = _table(
        f"RT-DETR training step (forward, loss with denoising queries, backward; three boxes per image), "
        f"{size}x{size}, batch {batch}, {device.type}, built from YAML without weights; median of {repeats}, "
        "interleaved:",
        rows,
        reference,
        batch,
    )
    metric = f"RT-DETR RevCol-S rev vs ResNet-50, {size}px batch {batch}: kept MB, step time (info)"
    return SectionResult(lines, [_versus(metric, rows["RT-DETR RevCol-S reversible"], rows["RT-DETR RevCol-S plain"],
                                         rows[reference])])  # fmt: skip


def section_footprint(cfg: Config) -> SectionResult:
    if not revcol.is_registered():  # importing revcol registers the YAML backbone and the timm models
        revcol.register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifiers = _classifiers(cfg, device)
    gc.collect()
    detectors = _detectors(cfg, device)
    return SectionResult([*classifiers.lines, "", *detectors.lines], classifiers.summaries + detectors.summaries)
