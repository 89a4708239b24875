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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from revcol.model import SubNet

NUM_LEVELS = 4


class _RngState:
    """CPU (and CUDA, for CUDA inputs) generator state, so drop-path masks replay exactly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _AutocastState:
    """The autocast state in force during forward, re-entered for the recompute in backward."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def context(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _uses_drop_path(subnet: SubNet) -> bool:
    return subnet.training and any(
        getattr(module, "drop_prob", 0.0) > 0 for module in subnet.modules() if module is not subnet
    )


class ReverseFunction(torch.autograd.Function):
    """Runs one column without keeping level activations; backward recomputes them level by level.

    ``apply`` inputs: the ``SubNet``, the level parameter counts, the frozen level parameters (only
    checked for in-place edits), ``x``, the previous column's four outputs (``None`` for the first
    column), the four (bounded) alphas, then every level parameter that requires grad. Use
    ``ReverseFunction.apply_column`` rather than ``apply``.
    """

    @staticmethod
    def apply_column(
        subnet: SubNet, x: torch.Tensor, previous: Sequence[torch.Tensor] | None, alphas: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Run ``subnet`` through the Function; returns its four outputs."""
        params: list[list[torch.nn.Parameter]] = []
        frozen: list[torch.nn.Parameter] = []
        for level in subnet.levels:
            level_params = list(level.parameters())
            params.append([p for p in level_params if p.requires_grad])
            frozen += [p for p in level_params if not p.requires_grad]
        inputs = list(previous) if previous is not None else [None] * NUM_LEVELS
        flat = [p for level_params in params for p in level_params]
        outputs = ReverseFunction.apply(subnet, [len(p) for p in params], frozen, x, *inputs, *alphas, *flat)
        return list(outputs)

    @staticmethod
    def forward(
        ctx: Any, subnet: SubNet, counts: list[int], frozen: list[torch.Tensor], x: torch.Tensor, *tensors: torch.Tensor
    ):
        previous = tensors[:NUM_LEVELS]
        alphas = tensors[NUM_LEVELS : 2 * NUM_LEVELS]
        params = tensors[2 * NUM_LEVELS :]
        first_column = previous[0] is None

        rng_states: list[_RngState] = []
        record_rng = _uses_drop_path(subnet)

        def before_level(level: int) -> None:
            if record_rng:
                rng_states.append(_RngState(x.device))

        outputs = subnet.forward_levels(x, None if first_column else list(previous), alphas, before_level)

        ctx.subnet, ctx.counts, ctx.first_column = subnet, counts, first_column
        ctx.training = subnet.training
        ctx.rng_states = rng_states
        ctx.autocast = _AutocastState(x.device.type)
        # Frozen parameters are not inputs (they need no gradient), but the recompute reads them too.
        ctx.params, ctx.frozen = params, frozen
        ctx.param_versions = [p._version for p in (*params, *frozen)]
        ctx.save_for_backward(x, *outputs, *alphas, *(() if first_column else previous))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None):
        x, *rest = ctx.saved_tensors
        outputs, alphas, previous = rest[:NUM_LEVELS], rest[NUM_LEVELS : 2 * NUM_LEVELS], rest[2 * NUM_LEVELS :]
        subnet: SubNet = ctx.subnet
        params = ctx.params
        if any(p._version != v for p, v in zip((*params, *ctx.frozen), ctx.param_versions, strict=True)):
            raise RuntimeError(
                f"RevCol: a parameter of {type(subnet).__name__} was modified in place between forward and "
                "backward (e.g. optimizer.step() before backward). The reversible backward recomputes the "
                "forward and would give wrong gradients; call backward first, or build with save_memory=False."
            )
        grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(grad_outputs, outputs, strict=True)]
        grad_x = None
        grad_previous: list[torch.Tensor | None] = [None] * NUM_LEVELS
        grad_alphas: list[torch.Tensor | None] = [None] * NUM_LEVELS
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        starts = [sum(ctx.counts[:level]) for level in range(NUM_LEVELS)]
        needs_x = ctx.needs_input_grad[3]

        levels = subnet.levels
        for level in reversed(range(NUM_LEVELS)):
            level_params = params[starts[level] : starts[level] + ctx.counts[level]]
            c_down = (x if level == 0 else outputs[level - 1]).detach()
            c_down.requires_grad_(level > 0 or needs_x)
            up_levels = levels[level].previous_levels  # empty in the first column
            c_ups = [previous[index].detach().requires_grad_() for index in up_levels]
            replay = ctx.rng_states[level].replay() if ctx.rng_states else contextlib.nullcontext()
            with torch.enable_grad(), ctx.autocast.context(), replay, _training_mode(subnet, ctx.training):
                f = levels[level](c_down, *c_ups)

            grad = grads[level]
            if ctx.first_column:
                grad_alphas[level] = torch.zeros_like(alphas[level])
            else:
                with torch.no_grad():
                    grad_alphas[level] = (
                        (grad * previous[level]).sum(dim=(0, 2, 3), keepdim=True).to(alphas[level].dtype)
                    )
                    grad_previous[level] = _add(grad_previous[level], grad * alphas[level])

            wrt = ([c_down] if c_down.requires_grad else []) + c_ups + list(level_params)
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
        return (None, None, None, grad_x, *grad_previous, *grad_alphas, *grad_params)


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
