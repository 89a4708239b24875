"""Reliability: inference path, alpha numerics, autocast, memory layouts, in-place edits, empty batch, warnings."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from revcol_helpers import (
    STRIDES,
    TINY_CHANNELS,
    assert_close_per_tensor,
    make_input,
    make_net,
    relative_error,
    run_grads,
)

import revcol
from revcol import ReverseFunction
from revcol.model import ALPHA_BOUND, bounded_alpha

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PACKAGE_DIR = Path(revcol.__file__).parent
CORE_MODULES = ["__init__.py", "model.py", "reversible.py", "variants.py", "pretrained.py"]


def _forbid_reverse_function(monkeypatch):
    def refuse(*args):
        raise AssertionError("inference must not go through ReverseFunction")

    monkeypatch.setattr(ReverseFunction, "apply", refuse)


def _set_alphas(model, value: float) -> None:
    with torch.no_grad():
        for subnet in model.subnets:
            for alpha in subnet.alphas:
                alpha.fill_(value)


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("mode", ["eval", "eval_no_grad", "train_no_grad", "train_inference_mode"])
def test_inference_runs_plain_forward_and_edits_no_parameter(mode, monkeypatch):
    model = make_net(num_subnet=3, drop_path=0.3)
    _set_alphas(model, 0.0)  # the value the authors' code clamped in place
    with torch.no_grad():
        model.subnet1.alpha2.fill_(-1e-4)
    versions = {n: p._version for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = make_input()
    with torch.no_grad():
        reference = model.eval()(x)

    _forbid_reverse_function(monkeypatch)
    model.train(mode.startswith("train"))
    if mode == "eval":
        outputs = model(x)
    elif mode == "train_inference_mode":
        with torch.inference_mode():
            outputs = model(x)
    else:
        with torch.no_grad():
            outputs = model(x)

    assert {n: p._version for n, p in model.named_parameters()} == versions
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]), name
    if not mode.startswith("train"):  # eval: deterministic, equal to the reference
        for a, e in zip(outputs, reference, strict=True):
            torch.testing.assert_close(a.detach(), e, rtol=0, atol=0)
    assert all(torch.isfinite(o).all() for o in outputs)


def test_training_step_edits_no_parameter_in_place():
    model = make_net(num_subnet=3)
    _set_alphas(model, 0.0)
    versions = {n: p._version for n, p in model.named_parameters()}
    for save_memory in (True, False):
        run_grads(model, make_input(), save_memory=save_memory)
    assert {n: p._version for n, p in model.named_parameters()} == versions
    assert all(bool((a == 0).all()) for s in model.subnets for a in s.alphas)


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
    _set_alphas(model, value)
    for subnet in model.subnets:
        for alpha in subnet.alphas:
            effective = bounded_alpha(alpha)
            assert bool((effective.abs() >= ALPHA_BOUND).all())
            assert bool((effective > 0).all()) if value >= 0 else bool((effective < 0).all())
    x = make_input(2, 64, 32)
    plain_out, plain = run_grads(model, x, save_memory=False, seed=1)
    rev_out, rev = run_grads(model, x, save_memory=True, seed=1)
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
        rev_out, rev = run_grads(model, x, save_memory=True, seed=4, autocast_dtype=torch.bfloat16)
        # backward ran outside the autocast block, yet each level's recompute ran under bf16 autocast
        assert len(states) == 2 * 4 * 3
        assert set(states) == {(True, torch.bfloat16)}
        states.clear()
        plain_out, plain = run_grads(model, x, save_memory=False, seed=4, autocast_dtype=torch.bfloat16)
        assert len(states) == 4 * 3
    finally:
        for handle in handles:
            handle.remove()
    _, full = run_grads(model, x, save_memory=False, seed=4)

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
    model = make_net(num_subnet=2, dtype=torch.float32)
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


# --------------------------------------------------------------------------- memory layouts


def test_non_contiguous_and_channels_last_inputs_give_same_outputs_and_gradients():
    model = make_net(num_subnet=2, drop_path=0.2)
    x = make_input(2, 64, 64)
    wide = torch.zeros(2, 3, 64, 128, dtype=torch.float64)
    wide[..., ::2] = x
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": wide[..., ::2],
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    assert layouts["channels_last"].is_contiguous(memory_format=torch.channels_last)
    assert not layouts["strided"].is_contiguous()
    assert not layouts["transposed"].is_contiguous()
    for save_memory in (True, False):
        ref_out, ref = run_grads(model, x, save_memory=save_memory, seed=2)
        for name, variant in layouts.items():
            out, grads = run_grads(model, variant, save_memory=save_memory, seed=2)
            for a, e in zip(out, ref_out, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
            assert_close_per_tensor(grads, ref, tol=1e-10, what=f"{name} gradient")


def test_channels_last_model():
    model = make_net(num_subnet=2)
    x = make_input(2, 64, 64)
    ref_out, ref = run_grads(model, x, save_memory=True)
    model = model.to(memory_format=torch.channels_last)
    out, grads = run_grads(model, x.contiguous(memory_format=torch.channels_last), save_memory=True)
    for a, e in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert_close_per_tensor(grads, ref, tol=1e-10)


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
    model = make_net(num_subnet=2)
    model.save_memory = True
    outputs = model(make_input())
    with torch.no_grad():
        model.get_parameter(parameter).add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        sum(o.sum() for o in outputs).backward()


def test_frozen_parameter_edited_between_forward_and_backward_raises():
    """A frozen parameter gets no gradient, but the recompute reads it: editing it would go unnoticed."""
    model = make_net(num_subnet=2)
    model.save_memory = True
    frozen = model.get_parameter("subnet1.level0.blocks.0.pwconv2.weight")
    frozen.requires_grad_(False)
    outputs = model(make_input())
    with torch.no_grad():
        frozen.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        sum(o.sum() for o in outputs).backward()


def test_optimizer_step_after_backward_is_fine():
    model = make_net(num_subnet=2)
    model.save_memory = True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second forward sees the versions bumped by the first step
        optimizer.zero_grad()
        sum(o.sum() for o in model(make_input())).backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("save_memory", [True, False])
def test_empty_batch_returns_empty_maps_and_zero_gradients(save_memory):
    """Decision: N=0 works (as for any conv net) and gives empty maps of the right shape."""
    model = make_net(num_subnet=2, drop_path=0.2, dtype=torch.float32)
    x = torch.zeros(0, 3, 64, 96)
    with torch.no_grad():
        eval_out = model.eval()(x)
    out, grads = run_grads(model, x, save_memory=save_memory)
    for outputs in (eval_out, out):
        assert [tuple(o.shape) for o in outputs] == [
            (0, c, 64 // s, 96 // s) for c, s in zip(TINY_CHANNELS, STRIDES, strict=True)
        ]
    assert grads["input"].shape == (0, 3, 64, 96)
    assert len(grads) == len(list(model.parameters())) + 1
    assert all(bool((g == 0).all()) for g in grads.values())


# --------------------------------------------------------------------------- deprecations


def test_core_source_uses_no_deprecated_api():
    forbidden = [
        "torch.cuda.amp",
        "get_autocast_gpu_dtype",
        "get_autocast_cpu_dtype",
        "timm.models.layers",
        "custom_fwd",
    ]
    for module in CORE_MODULES:
        text = (PACKAGE_DIR / module).read_text()
        for name in forbidden:
            assert name not in text, f"{module} uses deprecated {name}"
    assert re.search(r"is_autocast_enabled\(\s*\)", (PACKAGE_DIR / "reversible.py").read_text()) is None


def test_core_path_emits_no_deprecation_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = revcol.FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2, drop_path=0.1)
        x = make_input(dtype=torch.float32)
        for autocast in (None, torch.bfloat16):
            for save_memory in (True, False):
                run_grads(model, x, save_memory=save_memory, autocast_dtype=autocast)
        with torch.no_grad():
            model.eval()(x)
        torch.save(model.state_dict(), tmp_path / "w.pth")
        revcol.load_pretrained(model, tmp_path / "w.pth")
    from_revcol = [
        w
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and str(PACKAGE_DIR) in str(w.filename)
    ]
    assert from_revcol == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in from_revcol]


def test_switching_to_eval_between_forward_and_backward_keeps_gradients_exact():
    """The recompute runs in the forward's train mode (drop-path masks included), not the current one."""
    torch.manual_seed(0)
    model = revcol.FullNet([8, 16, 24, 32], [1, 1, 1, 1], 2, drop_path=0.5).double().train()
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
