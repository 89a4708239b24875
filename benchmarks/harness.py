"""What every benchmark section shares: configuration, model building, timing, saved-tensor accounting,
gradients, the summary row type, and the report's machine line and plot.

Imported by ``run.py`` (which puts ``benchmarks/`` on ``sys.path``) and by the modules of ``sections/``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from baseline import BaselineFullNet
from torch.utils.checkpoint import checkpoint

import revcol
from revcol import FullNet

MB = 1e6


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    channels: tuple[int, ...] = (64, 128, 256, 512)
    layers: tuple[int, ...] = (2, 2, 4, 2)
    columns: int = 8
    drop_path: float = 0.3
    size: int = 224
    batch: int = 2
    repeats: int = 21
    exact_columns: tuple[int, ...] = (4, 8, 16)
    exact_size: int = 224
    memory_columns: tuple[int, ...] = (2, 4, 8)
    eval_sizes: tuple[int, ...] = (224, 640)
    scale_sizes: tuple[int, ...] = (224, 320, 448, 640)
    scale_columns: tuple[int, ...] = (2, 4, 8, 16)
    scale_batch: int = 1
    scale_repeats: int = 3
    leak_steps: int = 5
    cuda_size: int = 640
    cuda_batch: int = 4
    footprint_size: int = 224  # classifiers of section footprint
    footprint_batch: int = 2
    detect_size: int = 640  # RT-DETR training steps of section footprint
    detect_batch: int = 1
    detect_repeats: int = 3
    name: str = "revcol_small shape"
    compile_eval: bool = True  # also time torch.compile of our eval model (needs a C++ compiler; ~1 min per size)
    smoke: bool = False  # goals are for the full configuration; a smoke run reports them as not applicable
    # The no-regression bounds (acceptance criteria). Saved memory has no number here: ours is held to
    # the baseline's bytes, measured side by side.
    goals: dict = field(
        default_factory=lambda: {
            "exact": 5e-6,  # fp32 gradient rel. error, reversible vs plain
            "exact64": 1e-9,  # the same in float64
            "train_vs_baseline": 1.0,  # baseline rev step time / ours rev step time
            "eval_vs_baseline": 1.0,  # baseline eval forward time / ours
            "eval_match": 1e-5,  # max rel. difference of the eval outputs, ours vs baseline
            "construct_vs_baseline": 1.0,  # baseline build time / ours (no forward, same configuration)
        }
    )


QUICK = Config(
    channels=(8, 16, 24, 32),
    layers=(1, 1, 1, 1),
    columns=2,
    drop_path=0.2,
    size=64,
    batch=2,
    repeats=3,
    exact_columns=(2, 3),
    exact_size=64,
    memory_columns=(2, 3),
    eval_sizes=(64,),
    scale_sizes=(32, 64),
    scale_columns=(1, 2),
    scale_batch=1,
    scale_repeats=1,
    leak_steps=3,
    cuda_size=64,
    cuda_batch=2,
    footprint_size=64,
    footprint_batch=2,
    detect_size=160,  # RT-DETR's 300 queries need at least 300 anchors: 20*20 + 10*10 + 5*5 at 160 px
    detect_batch=1,
    detect_repeats=1,
    name="tiny (smoke)",
    compile_eval=False,
    smoke=True,
)


def build(cfg: Config, impl: str = "ours", columns: int | None = None, save_memory: bool = True) -> torch.nn.Module:
    """A model of ``cfg``'s shape in train mode; ``impl`` is ``ours`` or ``baseline``."""
    columns = cfg.columns if columns is None else columns
    cls = BaselineFullNet if impl == "baseline" else FullNet
    model = cls(cfg.channels, cfg.layers, columns, drop_path=cfg.drop_path, save_memory=save_memory)
    return model.train()


def layer_scale_(model: torch.nn.Module, value: float) -> torch.nn.Module:
    """Set every ConvNeXt layer scale to ``value`` (at the paper's 1e-6 the blocks barely contribute)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(value)
    return model


def eval_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, baseline) in eval mode with identical weights (layer scale 0.1 so the blocks matter)."""
    with torch.random.fork_rng():  # the same weights on every call, without reseeding the caller
        torch.manual_seed(0)
        ours = build(cfg).eval()
        base = build(cfg, "baseline").eval()
    layer_scale_(ours, 0.1)
    base.load_state_dict(ours.state_dict())
    return ours, base


# ----------------------------------------------------------------------------------------------
# timing


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, minima: dict[str, float] | None = None
) -> dict[str, float]:
    """Median wall time of each callable; all run in turn every round (order rotated each round).

    ``minima``, when given, also gets each callable's fastest time (the least disturbed by other load).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    if minima is not None:
        minima.update({name: min(values) for name, values in times.items()})
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------------------
# training steps and what they save


class SavedTensors:
    """Counts the bytes of tensors saved for backward, deduplicated by storage (parameters listed apart)."""

    def __init__(self, model: torch.nn.Module | None = None, keep: torch.Tensor | None = None) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        # ``keep``: a tensor the caller holds anyway (the input batch); counted, but not as a leak
        self.kept = {keep.untyped_storage().data_ptr()} if keep is not None else set()
        self.storages: dict[int, int] = {}
        self.param_storages: dict[int, int] = {}
        self.refs: list[weakref.ref] = []

    def add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        (self.param_storages if key in self.params else self.storages)[key] = storage.nbytes()
        if key not in self.params and key not in self.kept:
            self.refs.append(weakref.ref(tensor))

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def activation_bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + sum(self.param_storages.values())

    def alive_bytes(self) -> int:
        """Bytes of the recorded (non-parameter) storages still referenced now."""
        alive = {}
        for ref in self.refs:
            tensor = ref()
            if tensor is not None:
                alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(alive.values())


@contextlib.contextmanager
def column_checkpointing(model: FullNet, recorder: SavedTensors | None = None) -> Iterator[None]:
    """Run every column of ``model`` (plain path) under non-reentrant ``torch.utils.checkpoint``.

    The checkpoint keeps its inputs alive by reference rather than saving them for backward, so when
    ``recorder`` is given those inputs are counted explicitly (what the checkpoint really holds).
    """

    def wrapped(original, x, previous, reversible=False):
        if recorder is not None:
            for tensor in [x, *(previous or [])]:
                recorder.add(tensor)
        return checkpoint(original, x, previous, False, use_reentrant=False)

    saved_memory = model.save_memory
    model.save_memory = False
    try:
        for subnet in model.subnets:
            subnet.forward = functools.partial(wrapped, type(subnet).forward.__get__(subnet))
        yield
    finally:
        for subnet in model.subnets:
            del subnet.forward
        model.save_memory = saved_memory


def loss_of(features: list[torch.Tensor]) -> torch.Tensor:
    """A loss that depends on every output element with distinct weights (so no gradient is trivial)."""
    total = 0.0
    for level, f in enumerate(features):
        weight = torch.linspace(-1.0, 1.0, f.shape[1], dtype=f.dtype, device=f.device).view(1, -1, 1, 1)
        total = total + (f * weight).mean() * (level + 1)
    return total


def train_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    mode: str,
    recorder: SavedTensors | None = None,
    split: list[tuple[float, float]] | None = None,
) -> None:
    """zero_grad + forward + backward; ``mode`` is ``plain``, ``rev`` or ``ckpt`` (``ckpt``: ours only).

    ``split``, when given, gets the (forward + loss, backward) seconds of this step appended.
    """
    model.zero_grad(set_to_none=True)
    if mode == "ckpt":
        ctx = column_checkpointing(model, recorder)
    else:
        model.save_memory = mode == "rev"
        ctx = contextlib.nullcontext()
    start = time.perf_counter()
    with ctx, recorder.recording() if recorder is not None else contextlib.nullcontext():
        features = model(x)
    loss = loss_of(features)
    middle = time.perf_counter()
    loss.backward()
    if split is not None:
        split.append((middle - start, time.perf_counter() - middle))


def saved_mb(model: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[float, float]:
    """(activation MB, activation + parameter MB) saved for backward by one training step."""
    recorder = SavedTensors(model)
    train_step(model, x, mode, recorder)
    return recorder.activation_bytes / MB, recorder.total_bytes / MB


def no_grad_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# exactness


def gradients(model: torch.nn.Module, x: torch.Tensor, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameter and input gradients of one training step; the seed fixes the drop-path draws."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    train_step(model, x, mode)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms, float64); the plain ``|a - b|`` when ``b`` is zero."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def max_rel_err(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``rel_err`` over matching feature maps."""
    return max(rel_err(a, b) for a, b in zip(actual, expected, strict=True))


# ----------------------------------------------------------------------------------------------
# reporting


@dataclass
class Summary:
    """One row of the report's summary table; ``met`` is None for information rows."""

    metric: str
    goal: str
    measured: str
    met: bool | None


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


def plot(scaling: dict, path: Path, title: str) -> None:
    """PNG of the scaling section: step time and saved memory vs input size and vs columns."""
    import matplotlib  # only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(9, 5), dpi=100)
    styles = {"plain": ("plain autograd", "o-"), "ckpt": ("checkpoint per column", "s--"), "rev": ("reversible", "^-")}
    panels = [
        (axes[0, 0], "size", "time", "step time vs input size", "s / step"),
        (axes[1, 0], "size", "mem", "saved memory vs input size", "MB saved (log)"),
        (axes[0, 1], "columns", "time", "step time vs columns", "s / step"),
        (axes[1, 1], "columns", "mem", "saved memory vs columns", "MB saved (log)"),
    ]
    for ax, axis, what, panel_title, ylabel in panels:
        keys = sorted(scaling[axis])
        for mode, (label, style) in styles.items():
            ax.plot(keys, [scaling[axis][k][what][mode] for k in keys], style, label=label, markersize=4)
        ax.set_title(panel_title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xticks(keys)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if what == "mem":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("input side (px)" if axis == "size" else "columns", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
