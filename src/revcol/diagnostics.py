"""Checking and measuring a RevCol model: reversible against plain-autograd gradients, bytes kept for backward.

``gradients`` runs one train-mode forward and backward on either path (``save_memory``), ``compare_gradients``
gives every tensor's relative error, and ``randomize_`` first gives every parameter a value that matters: at the
paper's initialisation (layer scale 1e-6) a wrong gradient inside a block would hardly show. ``SavedTensors``
counts the bytes autograd keeps for backward. ``examples/check_gradients.py``, ``examples/backbone.py``, the
benchmarks and the tests use them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["SavedTensors", "compare_gradients", "gradients", "output_weights", "randomize_", "relative_error"]


def randomize_(model: nn.Module, seed: int = 0, alpha_magnitude: tuple[float, float] = (0.5, 1.5)) -> nn.Module:
    """Give every parameter of ``model`` a non-trivial value, in place; returns ``model``.

    Layer scales (``gamma``) become ~0.5 instead of 1e-6, alphas get both signs and magnitudes in
    ``alpha_magnitude`` (a sign or scaling slip in the alpha terms would hide behind a uniform 0.5), and every
    other parameter gets noise of std 0.1 added. The same ``seed`` gives the same values.
    """
    generator = torch.Generator().manual_seed(seed)
    low, high = alpha_magnitude
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name.rsplit(".", 1)[-1].startswith("alpha"):
                magnitude = low + (high - low) * torch.rand(p.shape, generator=generator, dtype=torch.float64)
                sign = torch.where(torch.rand(p.shape, generator=generator) < 0.5, -1.0, 1.0).double()
                p.copy_(magnitude * sign)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.add_(0.1 * noise.to(device=p.device, dtype=p.dtype))
    return model


def output_weights(outputs: Sequence[torch.Tensor], seed: int = 2) -> list[torch.Tensor]:
    """Fixed random weights per output element, so a loss ``sum <w, output>`` reaches every element differently."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(o.shape, generator=generator, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
        for o in outputs
    ]


def gradients(
    model: nn.Module,
    x: torch.Tensor,
    *,
    save_memory: bool,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Train-mode forward and backward of ``sum_l <w_l, output_l>`` (``output_weights``); the outputs and gradients.

    ``save_memory`` picks the reversible path (``True``) or plain autograd. The global generator is seeded with
    ``seed`` right before the forward, so both paths draw the same drop-path masks. Gradient keys are the
    parameter names plus ``"input"``; ``x`` keeps its strides (no copy). ``autocast_dtype`` runs the forward
    under ``torch.autocast`` on ``x``'s device.
    """
    model.save_memory = save_memory
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    # no autocast block at all without a dtype: a disabled one would switch off the caller's autocast
    autocast = contextlib.nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, autocast_dtype)
    with autocast:
        outputs = model(x)
    loss = sum((o.to(w.dtype) * w).sum() for o, w in zip(outputs, output_weights(outputs), strict=True))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return [o.detach() for o in outputs], grads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` (Frobenius norms, in float64); the absolute error if ``expected`` is 0."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def compare_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """``relative_error`` per name of either dict; ``inf`` where one lacks it, the shapes differ or a value is not
    finite."""
    errors = {}
    for name in sorted(set(actual) | set(expected)):
        a, e = actual.get(name), expected.get(name)
        if a is None or e is None or a.shape != e.shape or not (torch.isfinite(a).all() and torch.isfinite(e).all()):
            errors[name] = math.inf
        else:
            errors[name] = relative_error(a, e)
    return errors


class SavedTensors:
    """Bytes of the tensors autograd saves for backward inside ``recording()``, counted once per storage.

    The storages of ``exclude`` (a model's parameters, say) are counted apart, in ``excluded``.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, tuple[int, tuple[int, ...]]] = {}  # data pointer: bytes, shape of a tensor on it
        self.excluded: dict[int, int] = {}  # data pointer: bytes

    def add(self, tensor: object) -> None:
        """Count ``tensor``'s storage (a no-op for anything else, and for meta tensors, which have none)."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded:
            self.excluded[key] = storage.nbytes()
        else:
            self.storages[key] = (storage.nbytes(), tuple(tensor.shape))

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensors]:
        """Count what autograd saves for backward in this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def activation_bytes(self) -> int:
        """Bytes of the saved storages, the excluded ones left out."""
        return sum(nbytes for nbytes, _ in self.storages.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of every saved storage, the excluded ones included."""
        return self.activation_bytes + sum(self.excluded.values())
