"""The reversible path (docs/design.md, "Reversible backward"): exact gradients, memory, alphas, autocast, safety."""

from __future__ import annotations

import pytest
import torch
from helpers.models import TINY_CONFIG, assert_close_per_tensor, count_nonzero_grads, make_input, make_net, set_alphas

import revcol
from revcol import ReverseFunction
from revcol.core.network import ALPHA_BOUND, bounded_alpha
from revcol.diagnostics import gradients, relative_error

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class ApplySpy:
    """Counts ``ReverseFunction.apply`` calls (to prove which path a forward took)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = ReverseFunction.apply

        def apply(*args):
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(ReverseFunction, "apply", apply)


@pytest.mark.parametrize("num_subnet", [1, 2, 4])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_float64_gradients_equal_plain_autograd(num_subnet, drop_path, monkeypatch):
    model = make_net(layers=(1, 2, 1, 1), num_subnet=num_subnet, drop_path=drop_path)
    x = make_input(4, 64, 32)
    spy = ApplySpy(monkeypatch)
    plain_out, plain = gradients(model, x, save_memory=False, seed=7)
    assert spy.calls == 0
    rev_out, rev = gradients(model, x, save_memory=True, seed=7)
    assert spy.calls == num_subnet

    for a, e in zip(rev_out, plain_out, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert len(plain) == len(list(model.parameters())) + 1  # every parameter and the input got a gradient
    assert_close_per_tensor(rev, plain, tol=1e-9)
    if not drop_path:
        # the comparison is not vacuous: only the first column's alphas (multiplying zeros) have zero gradient
        assert count_nonzero_grads(plain) == len(plain) - 4
    else:
        # masks really dropped something: a different seed gives different gradients
        _, other = gradients(model, x, save_memory=False, seed=8)
        with pytest.raises(AssertionError):
            assert_close_per_tensor(other, plain, tol=1e-3)


def test_float32_gradients_equal_plain_autograd():
    model = make_net(layers=(2, 1, 2, 1), num_subnet=4, drop_path=0.2, dtype=torch.float32)
    x = make_input(2, 64, 64, dtype=torch.float32)
    _, plain = gradients(model, x, save_memory=False, seed=3)
    _, rev = gradients(model, x, save_memory=True, seed=3)
    assert_close_per_tensor(rev, plain, tol=1e-4)


def test_paper_initialisation_gradients_equal_plain_autograd():
    """With the paper's init (gamma 1e-6, alpha 0.5) the blocks barely contribute; grads must still match."""
    model = make_net(num_subnet=3, randomize=False)
    x = make_input()
    _, plain = gradients(model, x, save_memory=False)
    _, rev = gradients(model, x, save_memory=True)
    assert_close_per_tensor(rev, plain, tol=1e-9)


def test_two_forwards_one_backward_and_retained_graph():
    """Each column's Function keeps its own state: two forwards summed, then backward twice on a kept graph."""
    model = make_net(drop_path=0.4)
    x1, x2 = make_input(2, seed=1), make_input(2, seed=2)

    def grads(save_memory):
        model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = sum(o.square().sum() for o in model(x1)) + sum((o * 0.5).sum() for o in model(x2))
        loss.backward(retain_graph=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    assert_close_per_tensor(grads(True), grads(False), tol=1e-9)


def test_frozen_stem_and_level_with_input_needing_no_grad():
    """Nothing to differentiate in a level (frozen, input without grad) must not break the backward."""
    model = make_net()
    for p in [*model.stem.parameters(), *model.subnet0.level0.parameters(), model.subnet1.alpha2]:
        p.requires_grad_(False)
    x = make_input()

    def grads(save_memory):
        model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        outputs = model(x)
        sum(o.sum() for o in outputs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    rev, plain = grads(True), grads(False)
    assert model.subnet1.alpha2.grad is None
    assert len(plain) == len(list(model.parameters())) - 4 - 9 - 1  # stem, one level-0 block, one alpha
    assert_close_per_tensor(rev, plain, tol=1e-9)


def test_only_some_outputs_used_in_loss():
    """Parameters that do not reach the loss get no gradient from plain autograd and a zero one here.

    (The Function returns a gradient for every parameter it was given; zeros rather than None is what
    DDP(find_unused_parameters=False) needs.)
    """
    model = make_net(num_subnet=3)
    x = make_input()

    def grads(save_memory):
        model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        model(xx)[1].sum().backward()
        named = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        return {**named, "x": xx.grad}, {n for n, p in model.named_parameters() if p.grad is None}

    (rev, rev_none), (plain, plain_none) = grads(True), grads(False)
    assert "subnet2.level3.blocks.0.pwconv1.weight" in plain_none
    assert rev_none <= plain_none
    assert all(bool((rev[n] == 0).all()) for n in plain_none)
    assert_close_per_tensor(rev, plain, tol=1e-9)


def _saved_bytes(model, x) -> tuple[int, dict[int, tuple[int, tuple[int, ...]]]]:
    """Bytes of the distinct storages autograd saves for backward, excluding parameters and the input image."""
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = model(x)
    return sum(n for n, _ in saved.values()), saved, outputs


def test_reversible_path_keeps_no_level_activations():
    num_subnet = 4
    model = make_net(layers=(2, 2, 2, 2), num_subnet=num_subnet, dtype=torch.float32).train()
    x = make_input(2, 64, 64, dtype=torch.float32).requires_grad_()

    model.save_memory = False
    plain_bytes, _, _ = _saved_bytes(model, x)
    model.save_memory = True
    rev_bytes, saved, outputs = _saved_bytes(model, x)

    feature_bytes = sum(o.numel() * o.element_size() for o in outputs)
    stem_bytes = 2 * 8 * 16 * 16 * 4
    # column outputs (one set per column) + the stem output and its LayerNorm input; the rest is per-channel
    # alpha bookkeeping, which is a few hundred bytes per column
    budget = num_subnet * feature_bytes + 2 * stem_bytes
    assert rev_bytes <= 1.1 * budget, f"reversible path saved {rev_bytes} bytes, budget {budget}"
    assert plain_bytes >= 5 * rev_bytes, f"plain {plain_bytes} bytes vs reversible {rev_bytes} bytes"
    # everything of any size is a column output or the stem output (NCHW or its NHWC LayerNorm view)
    allowed = {tuple(o.shape) for o in outputs} | {(2, 8, 16, 16), (2, 16, 16, 8)}
    large = {shape for nbytes, shape in saved.values() if nbytes > 2048}
    assert large <= allowed, f"unexpected saved activations: {sorted(large - allowed)}"


def test_reversible_activation_memory_does_not_grow_with_depth():
    """Deeper levels add activations to the plain path only."""
    x = make_input(2, 64, 64, dtype=torch.float32)
    sizes = {}
    for depth in (1, 3):
        model = make_net(layers=(depth,) * 4, dtype=torch.float32)
        for save_memory in (False, True):
            model.save_memory = save_memory
            sizes[depth, save_memory] = _saved_bytes(model, x)[0]
    assert sizes[3, True] <= 1.01 * sizes[1, True]
    assert sizes[3, False] > 2 * sizes[1, False]


# --------------------------------------------------------------------------- alpha numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_bounded_alpha_keeps_sign_and_magnitude(dtype):
    raw = [0.0, -0.0, 1e-4, -1e-4, 1e-3, -1e-3, 5e-4, -9.99e-4, 0.5, -2.0]
    expected = [1e-3, 1e-3, 1e-3, -1e-3, 1e-3, -1e-3, 1e-3, -1e-3, 0.5, -2.0]
    alpha = torch.tensor(raw, dtype=dtype, requires_grad=True)
    bounded = bounded_alpha(alpha)
    assert torch.equal(bounded, torch.tensor(expected, dtype=dtype))
    assert bool((bounded.abs() >= torch.tensor(ALPHA_BOUND, dtype=dtype)).all())
    # gradient passes straight through to the parameter
    grad = torch.arange(1.0, len(raw) + 1, dtype=dtype)
    bounded.backward(grad)
    assert torch.equal(alpha.grad, grad)
    # random values near zero never come out below the bound
    near_zero = (torch.rand(10_000, dtype=torch.float64) * 4e-3 - 2e-3).to(dtype)
    assert bool((bounded_alpha(near_zero).abs() >= torch.tensor(ALPHA_BOUND, dtype=dtype)).all())


@pytest.mark.parametrize("value", [0.0, 1e-4, -1e-4, 1e-3, -1e-3])
def test_tiny_alpha_reversible_gradients_finite_and_equal_plain(value):
    model = make_net(num_subnet=4)
    set_alphas(model, value)
    for subnet in model.subnets:
        for alpha in subnet.alphas:
            effective = bounded_alpha(alpha)
            assert bool((effective.abs() >= ALPHA_BOUND).all())
            assert bool((effective > 0).all()) if value >= 0 else bool((effective < 0).all())
    x = make_input(2, 64, 32)
    plain_out, plain = gradients(model, x, save_memory=False, seed=1)
    rev_out, rev = gradients(model, x, save_memory=True, seed=1)
    assert all(torch.isfinite(o).all() for o in rev_out)
    for a, e in zip(rev_out, plain_out, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert_close_per_tensor(rev, plain, tol=1e-9)
    assert rev["subnet2.alpha1"].abs().sum() > 0  # a zero alpha still learns


# --------------------------------------------------------------------------- autocast


# bf16 has an 8-bit significand: unit roundoff u = 2**-8 ~ 3.9e-3. The two paths run the same bf16 ops,
# but the stem output (bf16 under CPU autocast) feeds every column, and its bf16 gradient is summed in a
# different order (plain autograd adds all uses into one buffer; the Function returns one sum per column).
# Each bf16 addition rounds at u, so the stem and input gradients may differ by a few u; 2e-2 ~ 5u.
# Gradients inside the columns are computed from identical bf16 values and agree to fp32 rounding.
BF16_TOLERANCE = 2e-2


def test_bf16_autocast_gradients_match_and_recompute_under_autocast():
    model = make_net(layers=(1, 2, 1, 1), num_subnet=3, drop_path=0.2, dtype=torch.float32)
    x = make_input(2, 64, 64, dtype=torch.float32)
    states = []
    handles = [
        level.register_forward_hook(
            lambda m, i, o: states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        )
        for subnet in model.subnets
        for level in subnet.levels
    ]
    try:
        rev_out, rev = gradients(model, x, save_memory=True, seed=4, autocast_dtype=torch.bfloat16)
        # backward ran outside the autocast block, yet each level's recompute ran under bf16 autocast
        assert len(states) == 2 * 4 * 3
        assert set(states) == {(True, torch.bfloat16)}
        states.clear()
        plain_out, plain = gradients(model, x, save_memory=False, seed=4, autocast_dtype=torch.bfloat16)
        assert len(states) == 4 * 3
    finally:
        for handle in handles:
            handle.remove()
    _, full = gradients(model, x, save_memory=False, seed=4)

    for a, e in zip(rev_out, plain_out, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert_close_per_tensor(rev, plain, tol=BF16_TOLERANCE)
    worst_in_columns = max(relative_error(rev[n], plain[n]) for n in plain if n.startswith("subnet"))
    assert worst_in_columns <= 1e-3
    # sanity: bf16 gradients are a bf16-accurate version of the fp32 ones (guards against garbage in both)
    assert_close_per_tensor(rev, full, tol=0.2)


def test_backward_inside_autocast_recomputes_with_forward_state():
    """A forward without autocast is recomputed without autocast, even if backward is called inside one."""
    model = make_net(dtype=torch.float32)
    states = []
    handles = [
        level.register_forward_hook(lambda m, i, o: states.append(torch.is_autocast_enabled("cpu")))
        for subnet in model.subnets
        for level in subnet.levels
    ]
    try:
        model.save_memory = True
        outputs = model(make_input(dtype=torch.float32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sum(o.sum() for o in outputs).backward()
    finally:
        for handle in handles:
            handle.remove()
    assert states == [False] * (2 * 4 * 2)


# --------------------------------------------------------------------------- in-place edits


@pytest.mark.parametrize(
    "parameter",
    [
        "subnet1.level2.blocks.0.pwconv1.weight",
        "subnet0.level0.blocks.0.gamma",
        "subnet1.level1.fusion.up.channel_reschedule.0.bias",
    ],
)
def test_parameter_edited_between_forward_and_backward_raises(parameter):
    model = make_net()
    model.save_memory = True
    outputs = model(make_input())
    with torch.no_grad():
        model.get_parameter(parameter).add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        sum(o.sum() for o in outputs).backward()


def test_frozen_parameter_edited_between_forward_and_backward_raises():
    """A frozen parameter gets no gradient, but the recompute reads it: editing it would go unnoticed."""
    model = make_net()
    model.save_memory = True
    frozen = model.get_parameter("subnet1.level0.blocks.0.pwconv2.weight")
    frozen.requires_grad_(False)
    outputs = model(make_input())
    with torch.no_grad():
        frozen.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        sum(o.sum() for o in outputs).backward()


def test_optimizer_step_after_backward_is_fine():
    model = make_net()
    model.save_memory = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second forward sees the versions bumped by the first step
        optimizer.zero_grad()
        sum(o.sum() for o in model(make_input())).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- train/eval switch


def test_switching_to_eval_between_forward_and_backward_keeps_gradients_exact():
    """The recompute runs in the forward's train mode (drop-path masks included), not the current one."""
    torch.manual_seed(0)
    model = revcol.FullNet(**TINY_CONFIG, drop_path=0.5).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = {}
    for save_memory in (False, True):
        model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        outputs = model(x)
        model.eval()
        sum(o.square().sum() for o in outputs).backward()
        model.train()
        grads[save_memory] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, expected in grads[False].items():
        torch.testing.assert_close(grads[True][name], expected, rtol=1e-9, atol=1e-12, msg=name)
