"""RevCol benchmark suite: exactness, saved memory, training / inference speed, construction, scaling.

    python benchmarks/run.py            # full run (revcol_small shape; ~13 min on 2 CPU cores)
    python benchmarks/run.py --quick    # smoke run on a tiny configuration (seconds)

Every timing compares implementations side by side in one process: the candidates run in turn,
round after round (order rotated), and the median of each is reported, so that load from other
processes affects all of them alike. Ratios are what to read; absolute times depend on the machine.

Implementations compared:
* ``ours``      -- ``revcol.FullNet`` (``save_memory=True`` = reversible, ``False`` = plain autograd),
* ``ckpt``      -- ``revcol.FullNet`` with ``torch.utils.checkpoint`` around every column (the obvious
  alternative to a reversible backward),
* ``baseline``  -- ``benchmarks/baseline.py``: a straightforward rendering of the design in the
  authors' style, the reference the speed goals are measured against.

Writes a Markdown report (``--results``) and a plot (``--plot``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baseline import BaselineFullNet  # noqa: E402

import revcol  # noqa: E402
from revcol import FullNet  # noqa: E402

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
    name: str = "revcol_small shape"
    compile_eval: bool = True  # also time torch.compile of our eval model (needs a C++ compiler; ~1 min per size)
    smoke: bool = False  # goals are for the full configuration; a smoke run reports them as not applicable
    goals: dict = field(
        default_factory=lambda: {
            "exact": 5e-6,
            "exact64": 1e-9,
            "memory": {2: 13, 4: 19, 8: 30},
            "train_vs_baseline": 1.2,
            "rev_vs_plain": 1.25,
            "eval_vs_baseline": 1.3,
            "eval_match": 1e-5,
            "construct": 0.6,
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
    name="tiny (smoke)",
    compile_eval=False,
    smoke=True,
)


def build(cfg: Config, impl: str = "ours", columns: int | None = None, save_memory: bool = True) -> torch.nn.Module:
    columns = cfg.columns if columns is None else columns
    cls = BaselineFullNet if impl == "baseline" else FullNet
    model = cls(cfg.channels, cfg.layers, columns, drop_path=cfg.drop_path, save_memory=save_memory)
    return model.train()


# ----------------------------------------------------------------------------------------------
# measurement helpers


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
    """zero_grad + forward + backward; ``mode`` is ``plain``, ``rev`` or ``ckpt``.

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def gradients(model: torch.nn.Module, x: torch.Tensor, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    train_step(model, x, mode)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return grads


def layer_scale_(model: torch.nn.Module, value: float) -> torch.nn.Module:
    """Set every ConvNeXt layer scale to ``value`` (at the paper's 1e-6 the blocks barely contribute)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(value)
    return model


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


# ----------------------------------------------------------------------------------------------
# sections: each returns (markdown lines, summary rows, data for the plot)


@dataclass
class Summary:
    metric: str
    goal: str
    measured: str
    met: bool | None


def section_construction(cfg: Config) -> tuple[list[str], list[Summary]]:
    def ours():
        FullNet(cfg.channels, cfg.layers, cfg.columns, drop_path=cfg.drop_path)

    def base():
        BaselineFullNet(cfg.channels, cfg.layers, cfg.columns, drop_path=cfg.drop_path)

    t = interleaved({"ours": ours, "baseline": base}, cfg.repeats if cfg.smoke else max(cfg.repeats, 5))
    goal = cfg.goals["construct"]
    lines = [
        "| build (no forward) | median s |",
        "|---|---|",
        f"| ours | {t['ours']:.3f} |",
        f"| baseline (default module init + trunc_normal_) | {t['baseline']:.3f} |",
    ]
    return lines, [
        Summary(
            f"construction ({cfg.name}, {cfg.columns} columns)", f"<= {goal} s", f"{t['ours']:.3f} s", t["ours"] <= goal
        )
    ]


def section_exactness(cfg: Config) -> tuple[list[str], list[Summary]]:
    lines = [
        "Relative gradient error per tensor, reversible vs plain autograd (same seed, drop-path on, "
        "layer scale 0.1), max over all parameters and the input:",
        "",
        "| columns | dtype | max rel. error | worst tensor | baseline (authors' style) rev vs plain |",
        "|---|---|---|---|---|",
    ]
    worst32 = 0.0
    errors = {}
    for columns in cfg.exact_columns:
        for dtype in (torch.float32, torch.float64):
            if dtype == torch.float64 and columns != cfg.exact_columns[0]:
                continue
            size = cfg.exact_size if dtype == torch.float32 else min(cfg.exact_size, 64)
            torch.manual_seed(0)
            model = layer_scale_(build(cfg, columns=columns), 0.1).to(dtype)
            base = build(cfg, "baseline", columns=columns).to(dtype)
            base.load_state_dict(model.state_dict())
            x = torch.randn(cfg.batch, 3, size, size, dtype=dtype)
            ref = gradients(model, x, "plain")
            rev = gradients(model, x, "rev")
            err = {name: rel_err(rev[name], ref[name]) for name in ref}
            name = max(err, key=err.get)
            base_rev = gradients(base, x, "rev")
            base_err = max(rel_err(base_rev[n], ref[n]) for n in ref)
            lines.append(f"| {columns} | {str(dtype)[6:]} | {err[name]:.2e} | `{name}` | {base_err:.2e} |")
            errors[(columns, dtype)] = err[name]
            if dtype == torch.float32:
                worst32 = max(worst32, err[name])
            del model, base
            gc.collect()
    e64 = max(v for (c, d), v in errors.items() if d == torch.float64)
    cols = "/".join(str(c) for c in cfg.exact_columns)
    per_col = ", ".join(f"{errors[(c, torch.float32)]:.1e}" for c in cfg.exact_columns)
    return lines, [
        Summary(
            f"fp32 grad rel. error, rev vs plain ({cols} columns)",
            f"<= {cfg.goals['exact']:.0e}",
            per_col,
            worst32 <= cfg.goals["exact"],
        ),
        Summary(
            "fp64 grad rel. error, rev vs plain",
            f"<= {cfg.goals['exact64']:.0e}",
            f"{e64:.1e}",
            e64 <= cfg.goals["exact64"],
        ),
    ]


def section_memory(cfg: Config) -> tuple[list[str], list[Summary], dict]:
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
        goal = cfg.goals["memory"].get(columns)
        if goal is not None:
            measured = row["rev"][1]
            summaries.append(
                Summary(
                    f"saved MB, reversible, {columns} columns",
                    f"<= {goal} MB",
                    f"{measured:.1f} MB (plain {row['plain'][1]:.0f})",
                    measured <= goal,
                )
            )
        del model, base
        gc.collect()

    # no leak: what each step saves, and what of it is still alive after the step
    model = build(cfg)
    saved, alive = [], []
    for _ in range(cfg.leak_steps):
        recorder = SavedTensors(model, keep=x)
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
    return lines, summaries, data


def section_train(cfg: Config) -> tuple[list[str], list[Summary]]:
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
    t = interleaved(fns, cfg.repeats, minima=fastest)
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
    return lines, [
        Summary(
            "train step: baseline rev / ours rev",
            f">= {cfg.goals['train_vs_baseline']}x",
            f"{fmt_ratio(speedup)} (fastest runs: {fmt_ratio(fastest['baseline rev'] / fastest['ours rev'])})",
            speedup >= cfg.goals["train_vs_baseline"],
        ),
        Summary(
            "train step: ours rev / ours plain",
            f"<= {cfg.goals['rev_vs_plain']}x",
            f"{fmt_ratio(overhead)} (fastest runs: {fmt_ratio(fastest['ours rev'] / fastest['ours plain'])}; "
            f"bound {fmt_ratio(bound)})",
            overhead <= cfg.goals["rev_vs_plain"],
        ),
        Summary("train step: ours ckpt / ours plain (info)", "-", fmt_ratio(t["ours ckpt"] / t["ours plain"]), None),
    ]


def eval_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, baseline) in eval mode with identical weights (layer scale 0.1 so the blocks matter)."""
    with torch.random.fork_rng():  # the same weights in every process, without reseeding the caller
        torch.manual_seed(0)
        ours = build(cfg).eval()
        base = build(cfg, "baseline").eval()
    layer_scale_(ours, 0.1)
    base.load_state_dict(ours.state_dict())
    return ours, base


def no_grad_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(x)


def eval_fns(ours: torch.nn.Module, base: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {name: functools.partial(no_grad_forward, model, x) for name, model in (("baseline", base), ("ours", ours))}


def max_rel_err(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``rel_err`` over matching feature maps."""
    return max(rel_err(a, b) for a, b in zip(actual, expected, strict=True))


def eval_times(cfg: Config, size: int) -> tuple[dict[str, float], dict[str, float], float]:
    """(median s, fastest s, max rel. output difference) of ours and the baseline, in this process."""
    ours, base = eval_models(cfg)
    x = torch.randn(1, 3, size, size)
    diff = max_rel_err(no_grad_forward(ours, x), no_grad_forward(base, x))
    fastest: dict[str, float] = {}
    return interleaved(eval_fns(ours, base, x), cfg.repeats, minima=fastest), fastest, diff


# glibc tunables that keep freed memory in the heap for reuse: no mmap below 32 MiB (glibc's maximum
# threshold), no trimming of the heap top below 1 GiB. Process-wide, so the library never sets them.
GLIBC_KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def eval_times_in_fresh_process(
    cfg: Config, size: int, env: dict[str, str] | None = None
) -> tuple[dict[str, float], dict[str, float], float]:
    """``eval_times`` in a new interpreter (``--eval-worker``) that runs nothing else; ``env`` adds variables."""
    job = {"config": dataclasses.asdict(cfg), "size": size, "threads": torch.get_num_threads()}
    command = [sys.executable, str(Path(__file__).resolve()), "--eval-worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"eval worker failed ({done.returncode}):\n{done.stderr}")
    median, fastest, diff = json.loads(done.stdout.splitlines()[-1])
    return median, fastest, diff


def eval_worker(job: str) -> None:
    job = json.loads(job)
    torch.set_num_threads(job["threads"])
    print(json.dumps(eval_times(Config(**job["config"]), job["size"])))


def section_eval(cfg: Config) -> tuple[list[str], list[Summary]]:
    # glibc serves allocations at or above its mmap threshold with fresh mmaps (page-faulted in on first
    # touch); the threshold only rises when such a block is freed, so the same forward costs more in a
    # process that only runs inference than in one whose training steps already freed larger blocks. Both
    # regimes are measured: a fresh process per input size, and this process after one training step.
    ours, base = eval_models(cfg)
    compiled = "ours torch.compile" if cfg.compile_eval else None
    lines = [
        f"Eval forward (`torch.no_grad`), batch 1, {cfg.name}, {cfg.columns} columns; median of {cfg.repeats}. "
        "Two allocator regimes: *inference-only process* (a fresh process that runs nothing but these "
        "forwards, where large buffers keep coming from fresh, page-faulted mmaps) and *after training* "
        f"(in the process that first ran one training step of each model at {cfg.size}x{cfg.size}, batch "
        f"{cfg.batch}, so glibc reuses its grown heap); as information, the inference-only process again with "
        + ", ".join(f"`{k}={v}`" for k, v in GLIBC_KEEP_HEAP.items())
        + " (*glibc keeps heap*)"
        + (
            "; `torch.compile(dynamic=False)` (inductor, compiled once per input size, outside the timing) "
            "of our eval model as extra information"
            if compiled
            else ""
        )
        + ":",
        "",
        "| input | process | baseline s | ours s | speed-up | fastest runs | max rel. output difference |"
        + (" torch.compile s | compiled speed-up | compiled output difference |" if compiled else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if compiled else ""),
    ]
    x_train = torch.randn(cfg.batch, 3, cfg.size, cfg.size)
    for model in (ours, base):
        model.train()
        loss_of(model(x_train)).backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    summaries = []
    for size in cfg.eval_sizes:
        x = torch.randn(1, 3, size, size)
        reference = no_grad_forward(ours, x)
        diffs = {"after training": max_rel_err(reference, no_grad_forward(base, x))}
        fresh, fresh_fastest, diffs["inference-only"] = eval_times_in_fresh_process(cfg, size)
        kept, kept_fastest, diffs["glibc keeps heap"] = eval_times_in_fresh_process(cfg, size, GLIBC_KEEP_HEAP)

        fns = eval_fns(ours, base, x)
        extra = ""
        if compiled:
            try:
                torch._dynamo.reset()
                fns[compiled] = functools.partial(no_grad_forward, torch.compile(ours, dynamic=False), x)
                compiled_diff = max_rel_err(fns[compiled](), reference)
            except Exception as error:  # no C++ compiler, unsupported platform...: report, carry on
                fns.pop(compiled, None)
                extra = f" compile failed: {type(error).__name__} | - | - |"
        trained_fastest: dict[str, float] = {}
        trained = interleaved(fns, cfg.repeats, minima=trained_fastest)
        if compiled in trained:
            extra = f" {trained[compiled]:.3f} | {trained['baseline'] / trained[compiled]:.2f}x | {compiled_diff:.1e} |"

        speedups = {}
        no_compile = " - | - | - |" if compiled else ""
        for regime, t, fastest, tail in (
            ("inference-only", fresh, fresh_fastest, no_compile),
            ("after training", trained, trained_fastest, extra),
            ("glibc keeps heap", kept, kept_fastest, no_compile),
        ):
            speedups[regime] = t["baseline"] / t["ours"]
            lines.append(
                f"| {size}x{size} | {regime} | {t['baseline']:.3f} | {t['ours']:.3f} | {speedups[regime]:.2f}x "
                f"| {fastest['baseline'] / fastest['ours']:.2f}x | {diffs[regime]:.1e} |" + tail
            )
        goal = cfg.goals["eval_vs_baseline"]
        goal_regimes = ("inference-only", "after training")  # the glibc-tuned row is information only
        summaries.append(
            Summary(
                f"eval {size}x{size}: baseline / ours, eager (outputs match); inference-only / after-training process",
                f">= {goal}x in both, <= {cfg.goals['eval_match']:.0e}",
                " / ".join(fmt_ratio(speedups[r]) for r in goal_regimes) + f", {max(diffs.values()):.1e}",
                min(speedups[r] for r in goal_regimes) >= goal and max(diffs.values()) <= cfg.goals["eval_match"],
            )
        )
    torch._dynamo.reset()
    return lines, summaries


def section_scaling(cfg: Config) -> tuple[list[str], list[Summary], dict]:
    modes = ("plain", "ckpt", "rev")
    data: dict[str, dict] = {"size": {}, "columns": {}}
    lines = [
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
        t = interleaved(
            {mode: functools.partial(train_step, model, x, mode) for mode in modes}, cfg.scale_repeats, warmup=0
        )
        data[axis][key] = {"time": t, "mem": mem}
        label = f"{size}x{size}" if axis == "size" else f"{columns} columns"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{t[m]:.3f}" for m in modes)
            + " | "
            + " | ".join(f"{mem[m]:.1f}" for m in modes)
            + " |"
        )
        del model
        gc.collect()
    return lines, [], data


def section_compile(cfg: Config) -> tuple[list[str], list[Summary]]:
    tiny = FullNet((8, 16, 24, 32), (1, 1, 1, 1), 2).eval()
    x = torch.randn(1, 3, 64, 64)
    try:
        with torch.no_grad():  # the eval path: blocks reuse their buffers without autograd
            explanation = torch._dynamo.explain(tiny)(x)
    except Exception as error:  # report, do not fail the benchmark
        return [f"torch._dynamo.explain failed: {type(error).__name__}: {error}"], [
            Summary("torch.compile: eval graph breaks", "0", "explain failed", False)
        ]
    finally:
        torch._dynamo.reset()
    reasons = sorted({str(getattr(b, "reason", b)).splitlines()[0] for b in explanation.break_reasons})
    lines = [
        f"`torch._dynamo.explain` on a tiny eval model: {explanation.graph_count} graph(s), "
        f"{explanation.graph_break_count} graph break(s)." + ("" if not reasons else " Reasons: " + "; ".join(reasons))
    ]
    return lines, [
        Summary(
            "torch.compile: eval graph breaks (tiny config)",
            "0",
            str(explanation.graph_break_count),
            explanation.graph_break_count == 0,
        )
    ]


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")


def matmul_share(fn: Callable[[], object]) -> float:
    """Fraction of ``fn``'s CPU time (sum of self times) spent in matrix-multiplication kernels."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def section_profile(cfg: Config) -> tuple[list[str], list[Summary]]:
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
    return lines, []


def section_cuda(cfg: Config) -> tuple[list[str], list[Summary]]:
    if not torch.cuda.is_available():
        return ["CUDA: skipped (no GPU available)."], []
    lines, results = device_steps(cfg, torch.device("cuda"))
    summaries = []
    for precision in ("fp32", "fp16 autocast"):
        plain, rev = results.get(("plain", precision)), results.get(("rev", precision))
        if plain and rev:
            summaries.append(
                Summary(
                    f"CUDA {cfg.cuda_size}x{cfg.cuda_size} batch {cfg.cuda_batch} {precision}: rev / plain (info)",
                    "-",
                    f"time {rev[0] / plain[0]:.2f}x, peak memory {rev[1] / plain[1]:.2f}x",
                    None,
                )
            )
    return lines, summaries


def device_steps(cfg: Config, device: torch.device) -> tuple[list[str], dict[tuple[str, str], tuple[float, float]]]:
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
    results: dict[tuple[str, str], tuple[float, float]] = {}

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
                results[mode, precision] = (statistics.median(times), peak)
                lines.append(
                    f"| {mode} | {precision} | {statistics.median(times):.3f} | {peak:.0f} |"
                    if cuda
                    else f"| {mode} | {precision} | {statistics.median(times):.3f} | n/a |"
                )
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {mode} | {precision} | out of memory | - |")
            del model, step
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return lines, results


SECTIONS = {
    "construction": section_construction,
    "exactness": section_exactness,
    "memory": section_memory,
    "train": section_train,
    "eval": section_eval,
    "scaling": section_scaling,
    "compile": section_compile,
    "profile": section_profile,
    "cuda": section_cuda,
}


# ----------------------------------------------------------------------------------------------
# report


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
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads ({_cpu_count()} CPU cores visible), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, revcol {revcol.__version__}"
    )


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def plot(scaling: dict, path: Path, title: str) -> None:
    import matplotlib

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


def scaling_title(cfg: Config) -> str:
    return (
        f"RevCol training step, {cfg.name} ({cfg.columns} columns unless varied, {cfg.size}px unless varied), "
        f"batch {cfg.scale_batch}, {torch.get_num_threads()} CPU threads"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration, few repeats (smoke test)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS)
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 21; quick 3)")
    parser.add_argument("--results", type=Path, default=None, help="Markdown report (default benchmarks/results.md)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot (default docs/benchmark.png)")
    parser.add_argument("--no-write", action="store_true", help="print only; write neither report nor plot")
    parser.add_argument("--no-compile", action="store_true", help="skip timing torch.compile in the eval section")
    parser.add_argument("--eval-worker", help=argparse.SUPPRESS)  # internal: one fresh-process eval timing
    args = parser.parse_args(argv)
    if args.eval_worker:
        eval_worker(args.eval_worker)
        return ""

    # Tiny tensors on a busy 2-core machine spend most of their time in thread-pool synchronisation.
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    cfg = dataclasses.replace(QUICK) if args.quick else Config()
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.no_compile:
        cfg.compile_eval = False
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    results = args.results or (None if args.quick else HERE / "results.md")
    plot_path = args.plot or (None if args.quick else HERE.parent / "docs" / "benchmark.png")

    summaries: list[Summary] = []
    details: list[str] = []
    extra: dict[str, dict] = {}
    started = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        out = SECTIONS[name](cfg)
        lines, rows = out[0], out[1]
        if len(out) > 2:
            extra[name] = out[2]
        if cfg.smoke:
            rows = [Summary(r.metric, r.goal + " (full run)", r.measured, None) for r in rows]
        summaries += rows
        details += [f"### {name}", "", *lines, ""]
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    command = "python benchmarks/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = [
        f"# RevCol benchmarks ({cfg.name})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Total time: {time.perf_counter() - started:.0f} s",
        "",
        *summary_table(summaries),
        "",
        *details,
    ]
    report += [
        "### notes",
        "",
        "- Timings come from a machine that may be shared: every comparison runs in one process and interleaves its "
        "candidates round by round and reports medians, so read the ratios, not the absolute seconds.",
        "- `FullNet` runs channels-last in memory (its conv weights are allocated channels-last; parameter names "
        "and shapes are those of the authors' checkpoints), so its outputs are channels-last tensors of the usual "
        "NCHW shapes.",
    ]
    text = "\n".join(report).rstrip() + "\n"
    print(text)
    if not args.no_write:
        if results is not None:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(text)
        if plot_path is not None and "scaling" in extra:
            plot(extra["scaling"], plot_path, scaling_title(cfg))
    return text


if __name__ == "__main__":
    main()
