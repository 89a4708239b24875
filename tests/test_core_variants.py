"""The variants of docs/design.md (``revcol.core.variants``) and their functions (``revcol.factory``): configurations,
parameter names and shapes of the authors' checkpoints, parameter counts, keyword overrides, unknown names."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers.design_reference import expected_parameters
from helpers.models import STRIDES, TINY_CONFIG

import revcol
from revcol import FullNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TABLE = {
    "revcol_tiny": ((64, 128, 256, 512), (2, 2, 4, 2), 4, 0.1, 29.9),
    "revcol_small": ((64, 128, 256, 512), (2, 2, 4, 2), 8, 0.3, 60.1),
    "revcol_base": ((72, 144, 288, 576), (1, 1, 3, 2), 16, 0.4, 138.0),
    "revcol_large": ((128, 256, 512, 1024), (1, 2, 6, 2), 8, 0.5, 272.1),
    "revcol_xlarge": ((224, 448, 896, 1792), (1, 2, 6, 2), 8, 0.5, 832.0),
}


@functools.cache
def meta_variant(name: str) -> FullNet:
    """A variant built on the meta device (shared between tests; never modified)."""
    with torch.device("meta"):
        return revcol.build_variant(name)


@pytest.mark.parametrize("name", list(TABLE))
def test_variant_width_list_and_feature_info(name):
    channels = TABLE[name][0]
    model = meta_variant(name)
    assert model.width_list == list(channels)
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == list(zip(channels, STRIDES, strict=True))


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
        model = FullNet(**TINY_CONFIG)
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
