"""The reversible path (design section 2): same gradients as plain autograd, no level activations kept."""

from __future__ import annotations

import pytest
import torch
from revcol_helpers import assert_close_per_tensor, count_nonzero_grads, make_input, make_net, run_grads

from revcol import ReverseFunction

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
    plain_out, plain = run_grads(model, x, save_memory=False, seed=7)
    assert spy.calls == 0
    rev_out, rev = run_grads(model, x, save_memory=True, seed=7)
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
        _, other = run_grads(model, x, save_memory=False, seed=8)
        with pytest.raises(AssertionError):
            assert_close_per_tensor(other, plain, tol=1e-3)


def test_float32_gradients_equal_plain_autograd():
    model = make_net(layers=(2, 1, 2, 1), num_subnet=4, drop_path=0.2, dtype=torch.float32)
    x = make_input(2, 64, 64, dtype=torch.float32)
    _, plain = run_grads(model, x, save_memory=False, seed=3)
    _, rev = run_grads(model, x, save_memory=True, seed=3)
    assert_close_per_tensor(rev, plain, tol=1e-4)


def test_paper_initialisation_gradients_equal_plain_autograd():
    """With the paper's init (gamma 1e-6, alpha 0.5) the blocks barely contribute; grads must still match."""
    model = make_net(num_subnet=3, randomize=False)
    x = make_input()
    _, plain = run_grads(model, x, save_memory=False)
    _, rev = run_grads(model, x, save_memory=True)
    assert_close_per_tensor(rev, plain, tol=1e-9)


def test_two_forwards_one_backward_and_retained_graph():
    """Each column's Function keeps its own state: two forwards summed, then backward twice on a kept graph."""
    model = make_net(num_subnet=2, drop_path=0.4)
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
    model = make_net(num_subnet=2)
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
        model = make_net(layers=(depth,) * 4, num_subnet=2, dtype=torch.float32)
        for save_memory in (False, True):
            model.save_memory = save_memory
            sizes[depth, save_memory] = _saved_bytes(model, x)[0]
    assert sizes[3, True] <= 1.01 * sizes[1, True]
    assert sizes[3, False] > 2 * sizes[1, False]
