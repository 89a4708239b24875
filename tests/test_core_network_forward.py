"""``FullNet``'s forward (``revcol.core.network``): the equations of docs/design.md, forward hooks, recovering a
column's inputs, the plain path of inference, memory layouts and empty batches."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers.design_reference import reference_forward
from helpers.models import STRIDES, TINY_CHANNELS, assert_close_per_tensor, make_input, make_net, set_alphas

from revcol import FullNet, ReverseFunction, SubNet, UpSample
from revcol.core.network import bounded_alpha
from revcol.diagnostics import gradients, randomize_

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- forward math


@pytest.mark.parametrize(("layers", "num_subnet", "kernel_size"), [((1, 2, 1, 2), 3, 3), ((2, 1, 1, 1), 2, 5)])
def test_forward_matches_design_equations(layers, num_subnet, kernel_size):
    model = make_net(layers=layers, num_subnet=num_subnet, kernel_size=kernel_size).eval()
    x = make_input(2, 64, 32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = reference_forward(params, x, layers, num_subnet, kernel_size)
        actual = model(x)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- any input size

ODD_SIZES = [(33, 47), (75, 101), (97, 131), (100, 37)]


def _huge_wiring(dtype: torch.dtype = torch.float64, drop_path: float = 0.0) -> FullNet:
    """Three columns with RevCol-H's level-3 -> level-0 branch (x8), randomized: every up path is exercised."""
    torch.manual_seed(0)
    model = FullNet(TINY_CHANNELS, (1, 2, 1, 1), 3, drop_path=drop_path, level0_from_coarsest=True).to(dtype)
    return randomize_(model).train()


@pytest.mark.parametrize(("h", "w"), [(32, 32), (32, 33), *ODD_SIZES, (223, 229)])
def test_any_size_gives_the_floor_sizes_of_timm_convnext(h, w):
    model = _huge_wiring(torch.float32).eval()
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        shapes = [tuple(c.shape[-2:]) for c in model(x)]
    assert shapes == [(h // s, w // s) for s in STRIDES]
    if (h, w) == (223, 229):  # the sizes the issue quotes, and timm's own ConvNeXt on the same input
        assert shapes == [(55, 57), (27, 28), (13, 14), (6, 7)]
        convnext = timm.create_model("convnext_atto", features_only=True).eval()
        with torch.no_grad():
            assert shapes == [tuple(c.shape[-2:]) for c in convnext(x)]


@pytest.mark.parametrize(("h", "w"), ODD_SIZES[:2])
def test_odd_sizes_follow_the_design_equations(h, w):
    """Each up path hands fine pixel i the coarse pixel it was strided from, and the last one to pixels past it."""
    model = _huge_wiring().eval()
    x = make_input(2, h, w)
    with torch.no_grad():
        expected = reference_forward(dict(model.named_parameters()), x, (1, 2, 1, 1), 3, 3, level0_from_coarsest=True)
        actual = model(x)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("h", "w"), ODD_SIZES)
def test_reversible_backward_is_exact_at_odd_sizes(h, w):
    model = _huge_wiring(drop_path=0.3)
    x = make_input(2, h, w)
    _, plain = gradients(model, x, save_memory=False, seed=3)
    _, rev = gradients(model, x, save_memory=True, seed=3)
    assert_close_per_tensor(rev, plain, tol=1e-9)


def test_multiples_of_32_give_the_outputs_of_the_plain_factor_upsampling(monkeypatch):
    """Bit for bit what the network gave before it took odd sizes: nearest x factor, nothing else."""
    model = _huge_wiring(torch.float32).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        now = model(x)

        def factor_only(self, c, size):
            c = self.channel_reschedule(c.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return F.interpolate(c, scale_factor=float(self.factor), mode="nearest")

        monkeypatch.setattr(UpSample, "forward", factor_only)
        before = model(x)
    for a, b in zip(now, before, strict=True):
        assert torch.equal(a, b)


def test_train_mode_without_drop_path_equals_eval_for_both_paths():
    model = make_net(num_subnet=3)
    x = make_input()
    with torch.no_grad():
        reference = model.eval()(x)
    model.train()
    for save_memory in (False, True):
        model.save_memory = save_memory
        for a, e in zip(model(x), reference, strict=True):
            torch.testing.assert_close(a.detach(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [False, True])
def test_outputs_seen_by_global_forward_hooks_are_never_overwritten(train):
    """A hook that keeps every module output (as feature extractors do) sees each one unchanged afterwards."""
    model = make_net(layers=(2, 1, 1, 1), drop_path=0.2).train(train)
    kept = []

    def keep(module, args, output):
        for tensor in output if isinstance(output, (list, tuple)) else [output]:
            kept.append((type(module).__name__, tensor, tensor.detach().clone()))

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        with torch.no_grad():
            model(make_input(2, 64, 64))
    finally:
        handle.remove()
    assert len(kept) > 100
    changed = [name for name, tensor, copy in kept if not torch.equal(tensor, copy)]
    assert changed == [], f"{len(changed)} of {len(kept)} outputs changed after their hook saw them: {changed[:5]}"


@pytest.mark.parametrize("train", [False, True])
def test_a_forward_hook_on_any_module_fires(train):
    """Hooks on every named module (``stem``, columns, levels, fusions, blocks, output points) see the forward, on
    the plain path and the reversible one: no module's forward is bypassed by calling its children directly."""
    model = make_net(layers=(2, 1, 1, 1), drop_path=0.2).train(train)
    assert model.save_memory
    fired = set()
    handles = [m.register_forward_hook(lambda m, a, o, n=n: fired.add(n)) for n, m in model.named_modules()]
    try:
        model(make_input(2, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
    assert [name for name, _ in model.named_modules() if name not in fired] == []


def test_column_inputs_are_recovered_from_its_outputs():
    """A column's inputs are recovered exactly from x and its outputs, level 3 first (docs/design.md)."""
    model = make_net()
    subnet: SubNet = model.subnet1
    x = make_input(2, 64, 64)
    with torch.no_grad():
        stem = model.stem(x)
        previous = model.subnet0(stem, None)
        alphas = [bounded_alpha(a) for a in subnet.alphas]
        outputs = subnet.forward_levels(stem, previous, alphas)
        recovered = [None] * 4
        for level in reversed(range(4)):
            c_down = stem if level == 0 else outputs[level - 1]
            c_up = recovered[level + 1] if level < 3 else None
            recovered[level] = (outputs[level] - subnet.levels[level](c_down, c_up)) / alphas[level]
    for r, p in zip(recovered, previous, strict=True):
        torch.testing.assert_close(r, p, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- inference


def _forbid_reverse_function(monkeypatch):
    def refuse(*args):
        raise AssertionError("inference must not go through ReverseFunction")

    monkeypatch.setattr(ReverseFunction, "apply", refuse)


@pytest.mark.parametrize("mode", ["eval", "eval_no_grad", "train_no_grad", "train_inference_mode"])
def test_inference_runs_plain_forward_and_edits_no_parameter(mode, monkeypatch):
    model = make_net(num_subnet=3, drop_path=0.3)
    set_alphas(model, 0.0)  # the value the authors' code clamped in place
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
    set_alphas(model, 0.0)
    versions = {n: p._version for n, p in model.named_parameters()}
    for save_memory in (True, False):
        gradients(model, make_input(), save_memory=save_memory)
    assert {n: p._version for n, p in model.named_parameters()} == versions
    assert all(bool((a == 0).all()) for s in model.subnets for a in s.alphas)


# --------------------------------------------------------------------------- memory layouts


def test_non_contiguous_and_channels_last_inputs_give_same_outputs_and_gradients():
    model = make_net(drop_path=0.2)
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
        ref_out, ref = gradients(model, x, save_memory=save_memory, seed=2)
        for name, variant in layouts.items():
            out, grads = gradients(model, variant, save_memory=save_memory, seed=2)
            for a, e in zip(out, ref_out, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
            assert_close_per_tensor(grads, ref, tol=1e-10, what=f"{name} gradient")


def test_channels_last_model():
    model = make_net()
    x = make_input(2, 64, 64)
    ref_out, ref = gradients(model, x, save_memory=True)
    model = model.to(memory_format=torch.channels_last)
    out, grads = gradients(model, x.contiguous(memory_format=torch.channels_last), save_memory=True)
    for a, e in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert_close_per_tensor(grads, ref, tol=1e-10)


# --------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("save_memory", [True, False])
def test_empty_batch_returns_empty_maps_and_zero_gradients(save_memory):
    """Decision: N=0 works (as for any conv net) and gives empty maps of the right shape."""
    model = make_net(drop_path=0.2, dtype=torch.float32)
    x = torch.zeros(0, 3, 64, 96)
    with torch.no_grad():
        eval_out = model.eval()(x)
    out, grads = gradients(model, x, save_memory=save_memory)
    for outputs in (eval_out, out):
        assert [tuple(o.shape) for o in outputs] == [
            (0, c, 64 // s, 96 // s) for c, s in zip(TINY_CHANNELS, STRIDES, strict=True)
        ]
    assert grads["input"].shape == (0, 3, 64, 96)
    assert len(grads) == len(list(model.parameters())) + 1
    assert all(bool((g == 0).all()) for g in grads.values())
