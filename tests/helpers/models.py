"""The tiny RevCol of the tests, models with weights that matter, inputs, and per-tensor gradient assertions.

``TINY_CONFIG`` is the one tiny configuration: a test that needs "a small custom RevCol" uses it, or derives from it
(``{**TINY_CONFIG, "num_subnet": 3}``); ``yamls.TINY_OPTIONS`` is the same as a model YAML's row reads it. The
gradients themselves are ``revcol.diagnostics``' (``gradients``, ``compare_gradients``, ``randomize_``), which
examples/ and benchmarks/ use too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from revcol import FullNet, RevColClassifier, VariantSpec
from revcol.diagnostics import compare_gradients, randomize_

TINY_CHANNELS = (8, 16, 24, 32)
STRIDES = (4, 8, 16, 32)
# As FullNet's keyword arguments, and as a variant (with drop-path).
TINY_CONFIG = {"channels": TINY_CHANNELS, "layers": (1, 1, 1, 1), "num_subnet": 2}
TINY_SPEC = VariantSpec(**TINY_CONFIG, drop_path=0.1)


def make_net(
    channels: Sequence[int] = TINY_CONFIG["channels"],
    layers: Sequence[int] = TINY_CONFIG["layers"],
    num_subnet: int = TINY_CONFIG["num_subnet"],
    *,
    drop_path: float = 0.0,
    save_memory: bool = True,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    randomize: bool = True,
) -> FullNet:
    """A FullNet in train mode, built after ``torch.manual_seed(seed)``; its weights ``randomize_``d unless told
    (at the paper's initialisation a wrong gradient inside a block would hardly show)."""
    torch.manual_seed(seed)
    model = FullNet(channels, layers, num_subnet, kernel_size=kernel_size, drop_path=drop_path, save_memory=save_memory)
    model = model.to(dtype)
    if randomize:
        randomize_(model, seed)
    return model.train()


def make_input(n: int = 2, h: int = 32, w: int = 32, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    """Drawn in float64 whatever ``dtype``: every dtype sees the same values, rounded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=generator, dtype=torch.float64).to(dtype)


def seeded_images(size: int = 64, n: int = 1, seed: int = 0) -> torch.Tensor:
    """A float32 batch of ``n`` random RGB images, ``size`` pixels square."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_timm_model(**kwargs) -> RevColClassifier:
    """``timm.create_model("revcol_tiny", **kwargs)`` with non-trivial weights (layer scale 1e-6 would make every
    block nearly the identity)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", **kwargs)
    randomize_(model, seed=1)
    return model


def assert_close_per_tensor(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float, what: str = "gradient"
) -> float:
    """Same keys, and every tensor's relative error <= ``tol``; returns the worst error. ``compare_gradients``
    counts another shape or a value that is not finite as an infinite error."""
    assert set(actual) == set(expected), f"{what} keys differ: {sorted(set(actual) ^ set(expected))}"
    errors = compare_gradients(actual, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (
        f"{what} of {worst} differs: relative error {errors[worst]:.3e} > {tol:.1e} (inf: not finite, or shapes differ)"
    )
    return errors[worst]


def set_alphas(model: FullNet, value: float) -> None:
    """Every alpha of every column set to ``value``."""
    with torch.no_grad():
        for subnet in model.subnets:
            for alpha in subnet.alphas:
                alpha.fill_(value)


def count_nonzero_grads(grads: dict[str, torch.Tensor]) -> int:
    return sum(bool(g.abs().sum() > 0) for g in grads.values())
