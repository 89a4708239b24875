"""Size limits of a configuration (issue #19 item 6): refused in ``FullNet``'s checks before anything is built, so
Python, model-YAML rows and timm all get them, with the limit in the message."""

from __future__ import annotations

import itertools
import random

import pytest
import timm
import torch
import yaml
from revcol_helpers import TINY_CHANNELS, TINY_YOLO_YAML

import revcol
from revcol import ConfigError, FullNet, SubNet
from revcol.core.network import MAX_CHANNELS, MAX_COLUMNS, MAX_DEPTH, MAX_KERNEL, MAX_PARAMETERS, parameter_count

TINY = {"channels": TINY_CHANNELS, "layers": (1, 1, 1, 1), "num_subnet": 2}
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
        FullNet(**{**TINY, **kwargs})
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
            FullNet(**{**TINY, **over})


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
