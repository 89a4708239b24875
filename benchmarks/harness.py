"""What every benchmark section shares: the configuration, model building, timing, training steps and the bytes
they save for backward, and gradients."""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

import revcol
from benchmarks.baseline import BaselineFullNet
from revcol import FullNet, VariantSpec, diagnostics
from revcol.diagnostics import relative_error

MB = 1e6


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Shape:
    """The network a run measures: channels, depths, columns and drop-path of ``spec``, called ``name``."""

    name: str
    spec: VariantSpec


def variant_shape(variant: str) -> Shape:
    """The shape of a published variant, as ``revcol.VARIANTS`` declares it."""
    return Shape(f"{variant} shape", revcol.VARIANTS[variant])


# The no-regression bounds (acceptance criteria). Saved memory has no number here: ours is held to the
# baseline's bytes, measured side by side.
GOALS = {
    "exact": 5e-6,  # fp32 gradient rel. error, reversible vs plain
    "exact64": 1e-9,  # the same in float64
    "train_vs_baseline": 1.0,  # baseline rev step time / ours rev step time
    "eval_vs_baseline": 1.0,  # baseline eval forward time / ours
    "eval_match": 1e-5,  # max rel. difference of the eval outputs, ours vs baseline
    "construct_vs_baseline": 1.0,  # baseline build time / ours (no forward, same configuration)
}


@dataclass
class Config:
    """Input sizes, batches and repeats of each section, for a network of ``shape``."""

    shape: Shape = field(default_factory=lambda: variant_shape("revcol_small"))
    size: int = 224
    batch: int = 2
    repeats: int = 21
    warmup: int = 1  # untimed rounds before the timed ones (a smoke run's numbers mean nothing: it skips them)
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
    compile_eval: bool = True  # also time torch.compile of our eval model (needs a C++ compiler; ~1 min per size)
    smoke: bool = False  # goals are for the full configuration; a smoke run reports them as not applicable

    @property
    def name(self) -> str:
        return self.shape.name

    @property
    def channels(self) -> tuple[int, ...]:
        return self.shape.spec.channels

    @property
    def layers(self) -> tuple[int, ...]:
        return self.shape.spec.layers

    @property
    def columns(self) -> int:
        return self.shape.spec.num_subnet

    @property
    def drop_path(self) -> float:
        return self.shape.spec.drop_path


# The smallest network worth measuring: the smoke run's, and the one the compile section explains in any run.
TINY = Shape("tiny (smoke)", VariantSpec((8, 16, 24, 32), (1, 1, 1, 1), 2, 0.2))

QUICK = Config(
    shape=TINY,
    size=64,
    batch=2,
    repeats=3,
    warmup=0,
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


class StepRecorder(diagnostics.SavedTensors):
    """``revcol.diagnostics.SavedTensors`` with ``model``'s parameters counted apart, which also tells what of the
    recorded tensors is still alive after the step (``alive_bytes``: a leak)."""

    def __init__(self, model: torch.nn.Module | None = None, keep: torch.Tensor | None = None) -> None:
        """``keep``: a tensor the caller holds anyway (the input batch); counted, but not as a leak."""
        params = list(model.parameters()) if model is not None else []
        super().__init__(params)
        self._untracked = {t.untyped_storage().data_ptr() for t in [*params, *([keep] if keep is not None else [])]}
        self.refs: list[weakref.ref] = []

    def add(self, tensor: object) -> None:
        super().add(tensor)
        tracked = isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"
        if tracked and tensor.untyped_storage().data_ptr() not in self._untracked:
            self.refs.append(weakref.ref(tensor))

    def alive_bytes(self) -> int:
        """Bytes of the recorded (non-parameter) storages still referenced now."""
        alive = {}
        for ref in self.refs:
            tensor = ref()
            if tensor is not None:
                alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(alive.values())


@contextlib.contextmanager
def column_checkpointing(model: FullNet, recorder: StepRecorder | None = None) -> Iterator[None]:
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
    recorder: StepRecorder | None = None,
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
    recorder = StepRecorder(model)
    train_step(model, x, mode, recorder)
    return recorder.activation_bytes / MB, recorder.total_bytes / MB


def no_grad_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# exactness


def gradients(model: torch.nn.Module, x: torch.Tensor, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameter and input gradients of one training step in ``mode`` (``revcol.diagnostics.gradients``, whose
    seed fixes the drop-path draws); ``ckpt`` runs the plain path with every column checkpointed."""
    with column_checkpointing(model) if mode == "ckpt" else contextlib.nullcontext():
        return diagnostics.gradients(model, x, save_memory=mode == "rev", seed=seed)[1]


def max_rel_err(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``relative_error`` over matching feature maps."""
    return max(relative_error(a, b) for a, b in zip(actual, expected, strict=True))
