"""The reversible backward of a RevCol column (``docs/design.md``, section "Reversible backward").

Forward keeps only the column's stem input ``x``, its four outputs and the previous column's four
outputs (which the previous column keeps as its own outputs anyway: same storage, no extra memory).
Backward walks the levels from 3 to 0: it recomputes ``F_l = L_l(c_{l-1}', c_{l+1})`` (level 0 also
reads ``c_3`` with ``level0_from_coarsest``) with gradients on and backpropagates through ``F_l``; no
level activation is kept between forward and backward.

The previous column's ``c_l`` could also be recovered by the inverse ``(c_l' - F_l) / alpha_l``, but
that is never needed here, and its rounding error is amplified by ``1 / |alpha|`` at each level it
feeds (``c_{l+1}`` enters ``F_l``): about ``eps / |alpha|^4`` at level 0. In float32 that made the
gradients wrong by 6 % at ``|alpha| = 0.02`` and 80 % at ``0.01``; with the kept outputs they equal
plain autograd's for any alpha.

Every parameter the column uses is an explicit input of the Function and gets its gradient as a
return value (computed with ``torch.autograd.grad``), never by accumulating into ``.grad`` from
inside backward. The autograd graph therefore sees which parameters the forward used, which is
what ``DistributedDataParallel(find_unused_parameters=True)`` relies on.

The recompute must be the forward again, exactly, or the gradients are silently wrong. So it reuses
the drop-path draws the forward made (``DrawTape``), not the random generator, which other threads
share; it reads the parameter tensors the forward read, also when those were ``functional_call``'s
stand-ins rather than the module's own; and backward refuses parameters changed since forward (their
version counters, and ``_OptimizerSteps`` for fused optimizers, which leave the counters alone) and
``create_graph=True``, whose second-order graph it cannot build."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from revcol.core.blocks import NUM_LEVELS
from revcol.core.drop_path import TAPE, DrawTape, changed_drop_path

if TYPE_CHECKING:
    from revcol.core.network import SubNet


Named = list[tuple[str, torch.Tensor]]


class _OptimizerSteps:
    """Which optimizer step last updated each parameter, counted by a global optimizer step pre-hook.

    Fused optimizers (``Adam(fused=True)`` and others) update parameters in a kernel that does not bump
    their version counters, so the ``_version`` check alone misses a step between forward and backward.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self.count = 0
        # id(parameter) -> [weak reference to it, number of the last step that updated it]
        self._last: dict[int, list[Any]] = {}

    def start(self) -> int:
        """Count steps from now on (the hook is registered once per process); returns the count so far."""
        if self._hook is None:
            with self._lock:
                if self._hook is None:
                    self._hook = register_optimizer_step_pre_hook(self._step)
        return self.count

    def _step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._lock:
            self.count += 1
            for group in optimizer.param_groups:
                for p in group["params"]:
                    entry = self._last.get(id(p))
                    if entry is None or entry[0]() is not p:
                        entry = self._last[id(p)] = [weakref.ref(p, functools.partial(self._forget, id(p))), 0]
                    entry[1] = self.count

    def _forget(self, key: int, ref: weakref.ref) -> None:
        # Takes no lock: a garbage collection inside _step, which holds it, can run this.
        if self._last.get(key, [None])[0] is ref:
            self._last.pop(key, None)

    def stepped_since(self, count: int, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether a step after the first ``count`` updated one of ``tensors``."""
        if self.count == count:
            return False
        for t in tensors:
            entry = self._last.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] > count:
                return True
        return False


_OPTIMIZER_STEPS = _OptimizerSteps()


class _AutocastState:
    """The autocast state in force during forward, re-entered for the recompute in backward."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def context(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class ReverseFunction(torch.autograd.Function):
    """Runs one column without keeping level activations; backward recomputes them level by level.

    ``apply`` inputs: the ``SubNet``, each level's ``(name, tensor)`` parameters as its forward reads them,
    ``x``, the previous column's four outputs (``None`` for the first column), the four (bounded) alphas,
    then every one of those parameter tensors that requires grad, in the same order (as inputs, so that
    they get gradients). Use ``ReverseFunction.apply_column`` rather than ``apply``.
    """

    @staticmethod
    def apply_column(
        subnet: SubNet, x: torch.Tensor, previous: Sequence[torch.Tensor] | None, alphas: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Run ``subnet`` through the Function; returns its four outputs."""
        named = [list(level.named_parameters()) for level in subnet.levels]
        trainable = [t for level in named for _, t in level if t.requires_grad]
        inputs = list(previous) if previous is not None else [None] * NUM_LEVELS
        return list(ReverseFunction.apply(subnet, named, x, *inputs, *alphas, *trainable))

    @staticmethod
    def forward(ctx: Any, subnet: SubNet, named: list[Named], x: torch.Tensor, *tensors: torch.Tensor):
        previous = tensors[:NUM_LEVELS]
        alphas = tensors[NUM_LEVELS : 2 * NUM_LEVELS]
        first_column = previous[0] is None
        ctx.steps = _OPTIMIZER_STEPS.start()

        tapes: list[DrawTape] = []

        def before_level(level: int) -> None:
            tapes.append(DrawTape())
            TAPE.set(tapes[-1])

        token = TAPE.set(None)
        try:
            outputs = subnet.forward_levels(x, None if first_column else list(previous), alphas, before_level)
        finally:
            TAPE.reset(token)

        ctx.subnet, ctx.named, ctx.first_column = subnet, named, first_column
        ctx.trainable = [[t.requires_grad for _, t in level] for level in named]
        ctx.training = subnet.training
        ctx.draws = [tape.draws for tape in tapes]
        ctx.autocast = _AutocastState(x.device.type)
        ctx.versions = [t._version for level in named for _, t in level]
        ctx.save_for_backward(x, *outputs, *alphas, *(() if first_column else previous))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None):
        _check_recomputable(ctx)
        x, *rest = ctx.saved_tensors
        outputs, alphas, previous = rest[:NUM_LEVELS], rest[NUM_LEVELS : 2 * NUM_LEVELS], rest[2 * NUM_LEVELS :]
        subnet: SubNet = ctx.subnet
        grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(grad_outputs, outputs, strict=True)]
        grad_x = None
        grad_previous: list[torch.Tensor | None] = [None] * NUM_LEVELS
        grad_alphas: list[torch.Tensor | None] = [None] * NUM_LEVELS
        counts = [sum(flags) for flags in ctx.trainable]
        grad_params: list[torch.Tensor | None] = [None] * sum(counts)
        starts = [sum(counts[:level]) for level in range(NUM_LEVELS)]
        needs_x = ctx.needs_input_grad[2]

        levels = subnet.levels
        for level in reversed(range(NUM_LEVELS)):
            run, level_params = _with_forward_parameters(levels[level], ctx.named[level], ctx.trainable[level])
            c_down = (x if level == 0 else outputs[level - 1]).detach()
            c_down.requires_grad_(level > 0 or needs_x)
            up_levels = levels[level].previous_levels  # empty in the first column
            c_ups = [previous[index].detach().requires_grad_() for index in up_levels]
            f = _recompute(ctx, level, run, c_down, c_ups)

            grad = grads[level]
            if ctx.first_column:
                grad_alphas[level] = torch.zeros_like(alphas[level])
            else:
                with torch.no_grad():
                    grad_alphas[level] = (
                        (grad * previous[level]).sum(dim=(0, 2, 3), keepdim=True).to(alphas[level].dtype)
                    )
                    grad_previous[level] = _add(grad_previous[level], grad * alphas[level])

            wrt = ([c_down] if c_down.requires_grad else []) + c_ups + level_params
            # Nothing to differentiate when the level is frozen and its input needs no gradient.
            results = list(torch.autograd.grad(f, wrt, grad.to(f.dtype), allow_unused=True)) if wrt else []
            if c_down.requires_grad:
                grad_down = results.pop(0)
                if level == 0:
                    grad_x = grad_down
                else:
                    grads[level - 1] = _add(grads[level - 1], grad_down)
            for index in up_levels:
                grad_previous[index] = _add(grad_previous[index], results.pop(0))
            for offset, g in enumerate(results):
                grad_params[starts[level] + offset] = g
            del f

        if ctx.first_column:
            grad_previous = [None] * NUM_LEVELS
        return (None, None, grad_x, *grad_previous, *grad_alphas, *grad_params)


def _check_recomputable(ctx: Any) -> None:
    """Raise unless the recompute can be the forward again: no double backward, no parameter changed since."""
    if torch.is_grad_enabled():  # inside backward, grad mode is on exactly when create_graph=True
        raise RuntimeError(
            "RevCol's reversible backward (save_memory=True) does not support create_graph=True / double "
            "backward (e.g. a gradient penalty): it recomputes each level inside backward, and the gradients "
            "it returns are not differentiable. Build the model with save_memory=False (or set "
            "model.save_memory = False) for this loss."
        )
    used = [t for level in ctx.named for _, t in level]
    edited = any(t._version != v for t, v in zip(used, ctx.versions, strict=True))
    if edited or _OPTIMIZER_STEPS.stepped_since(ctx.steps, used):
        raise RuntimeError(
            f"RevCol: a parameter of {type(ctx.subnet).__name__} was modified in place between forward and "
            "backward (e.g. optimizer.step() before backward). The reversible backward recomputes the "
            "forward and would give wrong gradients; call backward first, or build with save_memory=False."
        )


def _recompute(
    ctx: Any, level: int, run: Callable[..., torch.Tensor], c_down: torch.Tensor, c_ups: list[torch.Tensor]
) -> torch.Tensor:
    """``L_level(c_down, *c_ups)`` again, with the forward's drop-path draws, autocast state and train mode."""
    tape = DrawTape(ctx.draws[level])
    token = TAPE.set(tape)
    try:
        with torch.enable_grad(), ctx.autocast.context(), _training_mode(ctx.subnet, ctx.training):
            f = run(c_down, *c_ups)
    finally:
        TAPE.reset(token)
    if tape.used != len(tape.draws):
        raise changed_drop_path()
    return f


def _with_forward_parameters(
    module: torch.nn.Module, named: Named, trainable: list[bool]
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    """A call of ``module`` that reads the parameter tensors its forward read, and the trainable ones to differentiate.

    Those are the module's own parameters, except under ``torch.func.functional_call`` (fast weights, as in
    MAML): its tensors were the module's only during that call, so the recompute passes them again.
    """
    tensors = [t for _, t in named]
    own = list(module.parameters())
    if len(own) == len(tensors) and all(a is b for a, b in zip(own, tensors, strict=True)):
        return module, [t for t, keep in zip(tensors, trainable, strict=True) if keep]
    stand_ins = {name: t.detach().requires_grad_(keep) for (name, t), keep in zip(named, trainable, strict=True)}

    def call(*args: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, stand_ins, args)

    return call, [stand_ins[name] for (name, _), keep in zip(named, trainable, strict=True) if keep]


@contextlib.contextmanager
def _training_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Recompute in the train/eval mode of the forward, even if the model was switched since."""
    previous = module.training
    if previous != training:
        module.train(training)
    try:
        yield
    finally:
        if previous != training:
            module.train(previous)


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    return value if total is None else total + value
