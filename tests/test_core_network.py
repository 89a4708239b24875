"""``FullNet`` (``revcol.core.network``): its outputs and ``feature_info``, the configuration checks and size limits
(refused before anything is built, so Python, model-YAML rows and timm all get them), ``parameter_count``, and the
input checks. The forward's math is ``test_core_network_forward.py``'s."""

from __future__ import annotations

import itertools
import random

import pytest
import timm
import torch
import yaml
from helpers.models import STRIDES, TINY_CHANNELS, TINY_CONFIG, make_input, make_net
from helpers.yamls import TINY_YOLO_YAML

import revcol
from revcol import ConfigError, FullNet, SubNet
from revcol.core.network import MAX_CHANNELS, MAX_COLUMNS, MAX_DEPTH, MAX_KERNEL, MAX_PARAMETERS, parameter_count
from revcol.diagnostics import randomize_

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- shapes and feature_info


@pytest.mark.parametrize(("h", "w"), [(32, 32), (64, 96)])
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_strides_and_channels(h, w, train):
    model = make_net(dtype=torch.float32, randomize=False).train(train)
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
    model = make_net().eval()
    model.feature_info = [{**i, "module": f"subnet1.level{k}"} for k, i in enumerate(model.feature_info)]
    with torch.no_grad():
        outputs, seen = _hooked_outputs(model, make_input())
    assert not any(torch.equal(calls[0], output) for output, calls in zip(outputs, seen, strict=True))


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
    config = {**TINY_CONFIG, **kwargs}
    with pytest.raises(ValueError, match=word):
        FullNet(**config)


def test_smallest_valid_configuration():
    model = FullNet((1, 1, 1, 1), (1, 1, 1, 1), 1, drop_path=0)
    assert [o.shape[1] for o in model(torch.zeros(1, 3, 32, 32))] == [1, 1, 1, 1]


# --------------------------------------------------------------------------- size limits (issue #19 item 6)


ABSURD = [
    ({"num_subnet": 1_000_000}, r"num_subnet must be an int in \[1, 256\], got 1000000"),
    (
        {"layers": [1, 1, 1, 1_000_000]},
        r"layers must be 4 ints in \[1, 64\] \(one per level\), got \[1, 1, 1, 1000000\]",
    ),
    ({"channels": [10**6] * 4}, r"channels must be 4 ints in \[1, 16384\]"),
    (
        {"channels": [8, 16, 24, 65536]},
        r"channels must be 4 ints in \[1, 16384\] \(one per level\), got \[8, 16, 24, 65536\]",
    ),
    ({"channels": [10**12] * 4}, r"channels must be 4 ints in \[1, 16384\]"),
    ({"kernel_size": 100001}, r"kernel_size must be a positive odd int, got 100001 \(at most 63\)"),
    ({"num_subnet": 10**12}, r"num_subnet must be an int in \[1, 256\]"),
    # each dimension within its limit, their product far beyond any model
    (
        {"channels": [8192] * 4, "layers": [64] * 4, "num_subnet": 256},
        r"would have 35,451,578,957,824 parameters, more than the limit of 20,000,000,000 \(RevCol-H has 2.2 B\)",
    ),
]


@pytest.fixture
def nothing_built(monkeypatch) -> list[int]:
    """Counts the columns built: a refused configuration builds none."""
    built: list[int] = []
    original = SubNet.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(SubNet, "__init__", spy)
    return built


@pytest.mark.parametrize(("kwargs", "message"), ABSURD)
def test_python_refuses_absurd_sizes_before_building(kwargs, message, nothing_built):
    with pytest.raises(ConfigError, match=message):
        FullNet(**{**TINY_CONFIG, **kwargs})
    assert nothing_built == []


@pytest.mark.parametrize(("kwargs", "message"), ABSURD[:3] + ABSURD[-1:])
def test_a_yaml_row_refuses_absurd_sizes_before_building(kwargs, message, nothing_built):
    from ultralytics.nn.tasks import DetectionModel

    d = yaml.safe_load(TINY_YOLO_YAML)
    d["backbone"][0][3][0].update({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    with pytest.raises(ConfigError, match=message):
        DetectionModel(d, verbose=False)
    assert nothing_built == []


@pytest.mark.parametrize(("kwargs", "message"), [ABSURD[5], ({"kernel_size": 65}, r"at most 63")])
def test_timm_refuses_absurd_sizes_before_building(kwargs, message, nothing_built):
    with pytest.raises(ConfigError, match=message):
        timm.create_model("revcol_tiny", **kwargs)
    assert nothing_built == []


def test_the_limits_admit_every_published_variant_and_refuse_one_more():
    for spec in revcol.VARIANTS.values():
        assert max(spec.channels) <= MAX_CHANNELS and max(spec.layers) <= MAX_DEPTH and spec.num_subnet <= MAX_COLUMNS
        config = (spec.channels, spec.layers, spec.num_subnet, 7, spec.level0_from_coarsest)
        assert parameter_count(*config) * 5 < MAX_PARAMETERS  # even with 7x7 kernels
    with torch.device("meta"):  # a limit itself is allowed (one column keeps this quick)
        FullNet((MAX_CHANNELS, 8, 8, 8), (1, 1, 1, 1), 1)
        FullNet((8, 8, 8, 8), (MAX_DEPTH, 1, 1, 1), 1, kernel_size=MAX_KERNEL)
    for over, limit in (
        ({"channels": (MAX_CHANNELS + 1, 8, 8, 8)}, MAX_CHANNELS),
        ({"layers": (MAX_DEPTH + 1, 1, 1, 1)}, MAX_DEPTH),
        ({"num_subnet": MAX_COLUMNS + 1}, MAX_COLUMNS),
        ({"kernel_size": MAX_KERNEL + 2}, MAX_KERNEL),
    ):
        with pytest.raises(ConfigError, match=rf"\b{limit}\b"):
            FullNet(**{**TINY_CONFIG, **over})


def test_parameter_count_is_the_built_models():
    # RevCol-T, and RevCol-H for its extra level-3 -> level-0 branch; then small random configurations
    specs = [revcol.VARIANTS["revcol_tiny"], revcol.VARIANTS["revcol_huge"]]
    configs = [(s.channels, s.layers, s.num_subnet, 3, s.level0_from_coarsest) for s in specs]
    rng = random.Random(0)
    for coarsest, kernel in itertools.product((False, True), (1, 3, 7)):
        channels = tuple(rng.randint(1, 40) for _ in range(4))
        configs.append((channels, tuple(rng.randint(1, 3) for _ in range(4)), rng.randint(1, 4), kernel, coarsest))
    for channels, layers, columns, kernel, coarsest in configs:
        with torch.device("meta"):
            model = FullNet(channels, layers, columns, kernel_size=kernel, level0_from_coarsest=coarsest)
        expected = sum(p.numel() for p in model.parameters())
        assert parameter_count(channels, layers, columns, kernel, coarsest) == expected, (channels, layers, columns)


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((1, 3, 31, 64), r"31x64"),
        ((1, 3, 64, 0), r"64x0"),
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
        assert "at least 32" in str(info.value)


def test_non_tensor_input_raises_value_error():
    model = make_net(randomize=False)
    with pytest.raises(ValueError, match="Tensor"):
        model([[0.0]])
