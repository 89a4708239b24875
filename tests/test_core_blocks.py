"""The building blocks (``revcol.core.blocks``, ``revcol.core.drop_path``): the initialisation of docs/design.md and
the authors' weight distribution, seeding and devices, and the drop-path schedule."""

from __future__ import annotations

import functools
import math

import pytest
import timm.layers
import torch
from helpers.models import TINY_CONFIG, make_input, make_net

from revcol import FullNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- initialisation


def test_initialisation_follows_design():
    torch.manual_seed(0)
    model = FullNet((32, 64, 96, 128), (1, 1, 1, 1), 2)
    conv_linear = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = torch.cat([m.weight.detach().flatten() for m in conv_linear])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(weights.mean().item()) < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in conv_linear)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    # stem + 3 fusion.down + 3 up (second column) + 8 blocks
    assert len(norms) == 1 + 2 * 3 + 3 + 8
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            assert bool((p == 1e-6).all()), name
        if ".alpha" in name:
            assert bool((p == 0.5).all()), name
    assert all(p.device.type == "cpu" for p in model.parameters())


def normal_cdf(x: torch.Tensor, std: float) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / (std * math.sqrt(2))))


def truncated_normal_cdf(x: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    low, high = normal_cdf(torch.tensor(a, dtype=x.dtype), std), normal_cdf(torch.tensor(b, dtype=x.dtype), std)
    return (normal_cdf(x, std) - low) / (high - low)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and ``cdf``."""
    x = samples.double().flatten().sort().values
    n = x.numel()
    f = cdf(x)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((steps - f).max().item(), (f - (steps - 1 / n)).max().item())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical CDFs."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / a.numel()
    fb = torch.searchsorted(b, grid, right=True) / b.numel()
    return (fa - fb).abs().max().item()


def ks_critical(n: int, m: int | None = None) -> float:
    """The KS distance that samples of the same distribution exceed with probability 0.001."""
    effective = n if m is None else n * m / (n + m)
    return 1.95 / math.sqrt(effective)


def test_initial_weights_have_the_authors_distribution():
    """timm's trunc_normal_(std=0.02): N(0, 0.02^2) truncated at the absolute values +-2, checked by a KS test."""
    torch.manual_seed(0)
    model = FullNet((64, 128, 256, 512), (1, 1, 1, 1), 1)
    weights = torch.cat(
        [m.weight.detach().flatten() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    )
    assert weights.numel() > 2_000_000
    assert weights.abs().max().item() <= 2.0
    assert ks_statistic(weights, functools.partial(normal_cdf, std=0.02)) < ks_critical(weights.numel())
    reference = timm.layers.trunc_normal_(torch.empty(weights.numel()), std=0.02)
    assert ks_two_sample(weights, reference) < ks_critical(weights.numel(), reference.numel())


def test_trunc_normal_redraws_everything_outside_its_bounds():
    """With bounds inside the bulk (here +-0.5 std), the rejection sampler matches the truncated normal and timm's."""
    from revcol.core.blocks import trunc_normal_

    torch.manual_seed(0)
    std, a, b = 0.02, -0.01, 0.01
    ours = trunc_normal_(torch.empty(400, 500), std, a, b)
    assert a <= ours.min().item() and ours.max().item() <= b
    assert ks_statistic(ours, functools.partial(truncated_normal_cdf, std=std, a=a, b=b)) < ks_critical(ours.numel())
    reference = timm.layers.trunc_normal_(torch.empty(ours.numel()), std=std, a=a, b=b)
    assert ks_two_sample(ours, reference) < ks_critical(ours.numel(), reference.numel())
    with pytest.raises(ValueError, match="a < 0 < b"):
        trunc_normal_(torch.empty(3), std, 0.01, 0.02)


def test_construction_is_seeded_and_respects_default_device():
    torch.manual_seed(3)
    a = FullNet(**TINY_CONFIG)
    torch.manual_seed(3)
    b = FullNet(**TINY_CONFIG)
    c = FullNet(**TINY_CONFIG)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.subnet1.level2.blocks[0].pwconv1.weight, c.subnet1.level2.blocks[0].pwconv1.weight)
    with torch.device("meta"):
        m = FullNet(**TINY_CONFIG)
    assert all(p.is_meta for p in m.parameters())


# --------------------------------------------------------------------------- drop-path


def test_drop_path_schedule_is_linspace_over_all_blocks_in_every_column():
    layers = (2, 1, 3, 2)
    model = make_net(layers=layers, num_subnet=3, drop_path=0.35, randomize=False)
    expected = torch.linspace(0, 0.35, sum(layers)).tolist()
    for subnet in model.subnets:
        rates = [
            getattr(block.drop_path, "drop_prob", 0.0) for level in subnet.levels for block in level.blocks.children()
        ]
        assert rates == pytest.approx(expected, abs=1e-7)


def test_drop_path_is_active_in_training_only():
    model = make_net(drop_path=0.5)
    x = make_input(8)
    with torch.no_grad():
        eval_out = model.eval()(x)
        torch.manual_seed(0)
        train_a = model.train()(x)
        torch.manual_seed(0)
        train_b = model(x)
        torch.manual_seed(1)
        train_c = model(x)
    assert not torch.allclose(train_a[3], eval_out[3])
    torch.testing.assert_close(train_a[3], train_b[3], rtol=0, atol=0)
    assert not torch.allclose(train_a[3], train_c[3])
