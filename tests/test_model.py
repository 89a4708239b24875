"""The network, its variants and parameter names (docs/design.md), inference, memory layouts, empty batches."""

from __future__ import annotations

import functools
import math

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from revcol_helpers import (
    STRIDES,
    TINY_CHANNELS,
    assert_close_per_tensor,
    make_input,
    make_net,
    randomize_,
    run_grads,
    set_alphas,
)

import revcol
from revcol import FullNet, ReverseFunction, SubNet
from revcol.core.network import bounded_alpha

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The variants table of docs/design.md: channels, depths, columns, drop_path, backbone params (M).
TABLE = {
    "revcol_tiny": ((64, 128, 256, 512), (2, 2, 4, 2), 4, 0.1, 29.9),
    "revcol_small": ((64, 128, 256, 512), (2, 2, 4, 2), 8, 0.3, 60.1),
    "revcol_base": ((72, 144, 288, 576), (1, 1, 3, 2), 16, 0.4, 138.0),
    "revcol_large": ((128, 256, 512, 1024), (1, 2, 6, 2), 8, 0.5, 272.1),
    "revcol_xlarge": ((224, 448, 896, 1792), (1, 2, 6, 2), 8, 0.5, 832.0),
}


def expected_parameters(channels, layers, num_subnet, kernel_size=3) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes generated from the section-4 patterns and the section-1 layer shapes."""
    c = channels
    shapes = {
        "stem.0.weight": (c[0], 3, 4, 4),
        "stem.0.bias": (c[0],),
        "stem.1.weight": (c[0],),
        "stem.1.bias": (c[0],),
    }
    for i in range(num_subnet):
        for level in range(4):
            cl = c[level]
            prefix = f"subnet{i}.level{level}"
            shapes[f"subnet{i}.alpha{level}"] = (1, cl, 1, 1)
            if level >= 1:
                shapes[f"{prefix}.fusion.down.0.weight"] = (cl, c[level - 1], 2, 2)
                shapes[f"{prefix}.fusion.down.0.bias"] = (cl,)
                shapes[f"{prefix}.fusion.down.1.weight"] = (cl,)
                shapes[f"{prefix}.fusion.down.1.bias"] = (cl,)
            if i >= 1 and level <= 2:
                shapes[f"{prefix}.fusion.up.channel_reschedule.0.weight"] = (cl, c[level + 1])
                shapes[f"{prefix}.fusion.up.channel_reschedule.0.bias"] = (cl,)
                shapes[f"{prefix}.fusion.up.channel_reschedule.1.weight"] = (cl,)
                shapes[f"{prefix}.fusion.up.channel_reschedule.1.bias"] = (cl,)
            for j in range(layers[level]):
                block = f"{prefix}.blocks.{j}"
                shapes[f"{block}.dwconv.weight"] = (cl, 1, kernel_size, kernel_size)
                shapes[f"{block}.dwconv.bias"] = (cl,)
                shapes[f"{block}.norm.weight"] = (cl,)
                shapes[f"{block}.norm.bias"] = (cl,)
                shapes[f"{block}.pwconv1.weight"] = (4 * cl, cl)
                shapes[f"{block}.pwconv1.bias"] = (4 * cl,)
                shapes[f"{block}.pwconv2.weight"] = (cl, 4 * cl)
                shapes[f"{block}.pwconv2.bias"] = (cl,)
                shapes[f"{block}.gamma"] = (cl,)
    return shapes


@functools.cache
def meta_variant(name: str) -> FullNet:
    """A variant built on the meta device (shared between tests; never modified)."""
    with torch.device("meta"):
        return revcol.build_variant(name)


# --------------------------------------------------------------------------- shapes and metadata


@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 96)])
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_strides_and_channels(h, w, train):
    model = make_net(num_subnet=2, dtype=torch.float32, randomize=False).train(train)
    outputs = model(make_input(2, h, w, dtype=torch.float32))
    assert isinstance(outputs, list)
    assert len(outputs) == 4
    for out, c, s in zip(outputs, TINY_CHANNELS, STRIDES, strict=True):
        assert out.shape == (2, c, h // s, w // s)
        assert out.dtype == torch.float32


def test_width_list_and_feature_info():
    model = make_net(channels=(8, 16, 32, 40), num_subnet=3, randomize=False)
    assert model.width_list == [8, 16, 32, 40]
    assert [f["num_chs"] for f in model.feature_info] == [8, 16, 32, 40]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    # feature_info names modules that exist: the last column's output points (see SubNet)
    names = dict(model.named_modules())
    assert [f["module"] for f in model.feature_info] == [f"subnet2.output{level}" for level in range(4)]
    assert all(f["module"] in names for f in model.feature_info)


def _hooked_outputs(model: FullNet, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The model's outputs, and what a forward hook on each module ``feature_info`` names saw (per call)."""
    modules = dict(model.named_modules())
    seen: list[list[torch.Tensor]] = [[] for _ in model.feature_info]
    handles = [
        modules[info["module"]].register_forward_hook(lambda m, args, out, k=k: seen[k].append(out))
        for k, info in enumerate(model.feature_info)
    ]
    try:
        outputs = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, seen


@pytest.mark.parametrize(
    ("layers", "num_subnet", "level0_from_coarsest"),
    [((1, 1, 1, 1), 1, False), ((2, 1, 1, 1), 3, False), ((1, 2, 1, 1), 2, True)],
)
@pytest.mark.parametrize(("train", "save_memory"), [(False, True), (True, False), (True, True)])
def test_feature_info_modules_output_exactly_the_returned_maps(
    layers, num_subnet, level0_from_coarsest, train, save_memory
):
    """A forward hook on each module feature_info names (timm's FeatureHooks) sees exactly that output."""
    torch.manual_seed(0)
    model = FullNet(
        TINY_CHANNELS,
        layers,
        num_subnet,
        drop_path=0.2,
        save_memory=save_memory,
        level0_from_coarsest=level0_from_coarsest,
    ).double()
    randomize_(model)
    model.train(train)
    x = make_input(2, 64, 32).requires_grad_(train)
    torch.manual_seed(1)
    outputs, seen = _hooked_outputs(model, x)
    for level, (output, calls) in enumerate(zip(outputs, seen, strict=True)):
        assert len(calls) == 1, f"level {level}: hook ran {len(calls)} times"
        assert torch.equal(calls[0], output), f"level {level}: the hooked module's output is not the returned map"
    if train:  # the reversible backward recomputes the levels, not the output points: no hook call on the way back
        sum(o.sum() for o in outputs).backward()
        assert all(len(calls) == 1 for calls in seen)


def test_feature_info_would_catch_a_module_before_the_column_update():
    """The check above can fail: the level modules (the old feature_info) return the maps before the update."""
    model = make_net(num_subnet=2).eval()
    model.feature_info = [{**i, "module": f"subnet1.level{k}"} for k, i in enumerate(model.feature_info)]
    with torch.no_grad():
        outputs, seen = _hooked_outputs(model, make_input())
    assert not any(torch.equal(calls[0], output) for output, calls in zip(outputs, seen, strict=True))


@pytest.mark.parametrize("name", list(TABLE))
def test_variant_width_list_and_feature_info(name):
    channels = TABLE[name][0]
    model = meta_variant(name)
    assert model.width_list == list(channels)
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == list(zip(channels, STRIDES, strict=True))


# --------------------------------------------------------------------------- forward math


def _ln_channels_first(x, weight, bias):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, 1e-6).permute(0, 3, 1, 2)


def _upsample_reference(p: dict[str, torch.Tensor], name: str, c: torch.Tensor, factor: int) -> torch.Tensor:
    """``name`` (an up path): channels-last Linear + LayerNorm, then every pixel repeated ``factor`` x ``factor``."""
    u = F.linear(
        c.permute(0, 2, 3, 1), p[f"{name}.channel_reschedule.0.weight"], p[f"{name}.channel_reschedule.0.bias"]
    )
    w, b = p[f"{name}.channel_reschedule.1.weight"], p[f"{name}.channel_reschedule.1.bias"]
    u = F.layer_norm(u, (u.shape[-1],), w, b, 1e-6).permute(0, 3, 1, 2)
    return u.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def reference_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, layers, num_subnet, kernel_size, level0_from_coarsest: bool = False
) -> list:
    """The network of docs/design.md in functional ops on the model's own parameters (eval mode: no drop-path).

    ``level0_from_coarsest``: RevCol-H's wiring, level 0 also adds ``fusion.up2`` of the previous column's c3 (x8).
    """

    def block(t, name):
        y = F.conv2d(
            t, p[f"{name}.dwconv.weight"], p[f"{name}.dwconv.bias"], padding=kernel_size // 2, groups=t.shape[1]
        )
        y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, (y.shape[-1],), p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], 1e-6)
        y = F.gelu(F.linear(y, p[f"{name}.pwconv1.weight"], p[f"{name}.pwconv1.bias"]))
        y = F.linear(y, p[f"{name}.pwconv2.weight"], p[f"{name}.pwconv2.bias"])
        y = y * p[f"{name}.gamma"]
        return t + y.permute(0, 3, 1, 2)

    def level_fn(i, level, c_down, c_up, c_coarsest):
        prefix = f"subnet{i}.level{level}.fusion"
        if level == 0:
            out = c_down
        else:
            out = F.conv2d(c_down, p[f"{prefix}.down.0.weight"], p[f"{prefix}.down.0.bias"], stride=2)
            out = _ln_channels_first(out, p[f"{prefix}.down.1.weight"], p[f"{prefix}.down.1.bias"])
        if i > 0 and level < 3:
            out = out + _upsample_reference(p, f"{prefix}.up", c_up, 2)
        if i > 0 and level == 0 and level0_from_coarsest:
            out = out + _upsample_reference(p, f"{prefix}.up2", c_coarsest, 8)
        for j in range(layers[level]):
            out = block(out, f"subnet{i}.level{level}.blocks.{j}")
        return out

    x = F.conv2d(x, p["stem.0.weight"], p["stem.0.bias"], stride=4)
    x = _ln_channels_first(x, p["stem.1.weight"], p["stem.1.bias"])
    c = [torch.zeros(()) for _ in range(4)]
    for i in range(num_subnet):
        new = []
        for level in range(4):
            down = x if level == 0 else new[-1]
            up = c[level + 1] if level < 3 else None
            new.append(level_fn(i, level, down, up, c[3]) + p[f"subnet{i}.alpha{level}"] * c[level])
        c = new
    return c


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
    model = make_net(layers=(2, 1, 1, 1), num_subnet=2, drop_path=0.2).train(train)
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
    model = make_net(layers=(2, 1, 1, 1), num_subnet=2, drop_path=0.2).train(train)
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
    model = make_net(num_subnet=2)
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
    a = FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2)
    torch.manual_seed(3)
    b = FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2)
    c = FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.subnet1.level2.blocks[0].pwconv1.weight, c.subnet1.level2.blocks[0].pwconv1.weight)
    with torch.device("meta"):
        m = FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2)
    assert all(p.is_meta for p in m.parameters())


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("name", list(TABLE))
def test_variant_parameter_names_and_shapes_match_checkpoints(name):
    channels, layers, columns, _, _ = TABLE[name]
    model = meta_variant(name)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_parameters(channels, layers, columns)
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))[:5]}, unexpected {sorted(set(actual) - set(expected))[:5]}"
    )
    assert actual == expected
    # every state entry is a parameter (no buffers that a checkpoint would lack)
    assert set(dict(model.named_parameters())) == set(expected)


@pytest.mark.parametrize("name", list(TABLE))
def test_variant_configuration_and_parameter_count(name):
    channels, layers, columns, drop_path, millions = TABLE[name]
    spec = revcol.VARIANTS[name]
    assert (spec.channels, spec.layers, spec.num_subnet, spec.drop_path) == (channels, layers, columns, drop_path)
    model = meta_variant(name)
    assert (model.channels, model.layers, model.num_subnet) == (channels, layers, columns)
    assert model.drop_path == drop_path
    assert model.save_memory is True
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == millions, f"{name}: {count / 1e6:.3f} M parameters, table says {millions} M"
    assert count == sum(math.prod(s) for s in expected_parameters(channels, layers, columns).values())


@pytest.mark.parametrize("name", list(TABLE))
def test_variant_functions_and_keyword_overrides(name):
    with torch.device("meta"):
        model = getattr(revcol, name)(drop_path=0.0, save_memory=False, kernel_size=5)
    assert model.num_subnet == TABLE[name][2]
    assert model.drop_path == 0.0
    assert model.save_memory is False
    assert model.subnet0.level0.blocks[0].dwconv.weight.shape[-2:] == (5, 5)


def test_building_runs_no_forward():
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(module))
    try:
        model = FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2)
        with torch.device("meta"):
            revcol.revcol_tiny()
            revcol.build_variant("revcol_base")
        assert calls == []
        model(torch.zeros(1, 3, 32, 32))  # the hook does see a forward
        assert len(calls) > 0
    finally:
        handle.remove()


def test_unknown_variant_lists_known_names():
    with pytest.raises(ValueError, match="revcol_giant") as info:
        revcol.build_variant("revcol_giant")
    for name in TABLE:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="revcol_tiny"):
        revcol.build_variant(["revcol_tiny"])


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"channels": (8, 16, 24)}, "channels"),
        ({"channels": (8, 16, 24, 0)}, "channels"),
        ({"channels": (8, 16, 24, -32)}, "channels"),
        ({"channels": (8, 16, 24, 32.0)}, "channels"),
        ({"channels": (8, 16, True, 32)}, "channels"),
        ({"channels": "8162"}, "channels"),
        ({"channels": 8}, "channels"),
        ({"layers": (1, 1, 1)}, "layers"),
        ({"layers": (1, 1, 1, 0)}, "layers"),
        ({"layers": (1, 1, 1, 1, 1)}, "layers"),
        ({"num_subnet": 0}, "num_subnet"),
        ({"num_subnet": -2}, "num_subnet"),
        ({"num_subnet": 1.5}, "num_subnet"),
        ({"drop_path": -0.1}, "drop_path"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"drop_path": 2}, "drop_path"),
        ({"drop_path": float("nan")}, "drop_path"),
        ({"drop_path": "0.1"}, "drop_path"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
    ],
)
def test_invalid_configuration_raises_value_error(kwargs, word):
    config = {"channels": TINY_CHANNELS, "layers": (1, 1, 1, 1), "num_subnet": 2, **kwargs}
    with pytest.raises(ValueError, match=word):
        FullNet(**config)


def test_smallest_valid_configuration():
    model = FullNet((1, 1, 1, 1), (1, 1, 1, 1), 1, drop_path=0)
    assert [o.shape[1] for o in model(torch.zeros(1, 3, 32, 32))] == [1, 1, 1, 1]


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((1, 3, 48, 64), r"48x64"),
        ((1, 3, 64, 40), r"64x40"),
        ((1, 3, 16, 16), r"16x16"),
        ((1, 1, 32, 32), r"3 input channels, got 1"),
        ((1, 4, 32, 32), r"3 input channels, got 4"),
        ((3, 32, 32), r"4-D.*\(3, 32, 32\)"),
        ((1, 1, 3, 32, 32), r"4-D"),
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_bad_input_raises_value_error(shape, pattern, train):
    model = make_net(randomize=False, dtype=torch.float32).train(train)
    with pytest.raises(ValueError, match=pattern) as info:
        model(torch.zeros(shape))
    if len(shape) == 4 and shape[1] == 3:
        assert "multiple" in str(info.value) and "32" in str(info.value)


def test_non_tensor_input_raises_value_error():
    model = make_net(randomize=False)
    with pytest.raises(ValueError, match="Tensor"):
        model([[0.0]])


def _forbid_reverse_function(monkeypatch):
    def refuse(*args):
        raise AssertionError("inference must not go through ReverseFunction")

    monkeypatch.setattr(ReverseFunction, "apply", refuse)


# --------------------------------------------------------------------------- inference


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
        run_grads(model, make_input(), save_memory=save_memory)
    assert {n: p._version for n, p in model.named_parameters()} == versions
    assert all(bool((a == 0).all()) for s in model.subnets for a in s.alphas)


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
