"""RevCol-H: the level-3 -> level-0 branch (``level0_from_coarsest``), the variant, its names and its weights."""

from __future__ import annotations

import io
import math

import pytest
import torch
import yaml
from helpers.design_reference import expected_parameters, reference_forward, up2_parameters
from helpers.models import TINY_CHANNELS, TINY_CONFIG, assert_close_per_tensor, make_input
from helpers.yamls import TINY_RTDETR_YAML

import revcol
from revcol import CheckpointError, FullNet, RevColBackbone, load_pretrained, weights
from revcol.diagnostics import gradients, randomize_
from revcol.factory import revcol_huge
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The authors' models/revcol_huge.py: channels, depths, columns, drop-path; README: 2.1 B parameters.
HUGE = ((360, 720, 1440, 2880), (1, 2, 6, 2), 8, 0.5)


def make_huge_like(layers=(1, 2, 1, 1), num_subnet=3, *, drop_path=0.0, seed=0) -> FullNet:
    torch.manual_seed(seed)
    model = FullNet(TINY_CHANNELS, layers, num_subnet, drop_path=drop_path, level0_from_coarsest=True).double()
    randomize_(model, seed)
    return model.train()


# --------------------------------------------------------------------------- the variant


def test_revcol_huge_names_shapes_and_parameter_count():
    channels, layers, columns, drop_path = HUGE
    with torch.device("meta"):
        model = revcol_huge()
    assert (model.channels, model.layers, model.num_subnet, model.drop_path) == (channels, layers, columns, drop_path)
    assert model.level0_from_coarsest is True
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_parameters(channels, layers, columns) | up2_parameters(channels, columns)
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))[:5]
    assert actual == expected
    assert set(dict(model.named_parameters())) == set(expected)
    count = sum(p.numel() for p in model.parameters())
    # the authors' "2.1B" (their table truncates; their classifier head adds another 2.9 M)
    assert count == sum(math.prod(s) for s in expected.values()) and 2.1e9 < count < 2.2e9
    assert round(count / 1e6, 1) == 2154.7


def test_revcol_huge_is_a_variant_as_data():
    spec = revcol.VARIANTS["revcol_huge"]
    assert (spec.channels, spec.layers, spec.num_subnet, spec.drop_path) == HUGE
    assert spec.fullnet_kwargs()["level0_from_coarsest"] is True
    # every other variant keeps the plain wiring (their checkpoints have no up2)
    assert [n for n, s in revcol.VARIANTS.items() if s.level0_from_coarsest] == ["revcol_huge"]
    with torch.device("meta"):
        model = revcol_huge(drop_path=0.1, save_memory=False, kernel_size=5)
    assert (model.drop_path, model.save_memory) == (0.1, False)
    assert model.subnet0.level0.blocks[0].dwconv.weight.shape[-2:] == (5, 5)


def test_revcol_huge_in_a_yaml_backbone_line():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    d = yaml.safe_load(TINY_RTDETR_YAML)
    d["backbone"][0] = [-1, 1, "revcol_huge", []]
    with torch.device("meta"):
        backbone = RTDETRDetectionModel(d, verbose=False).model[0]
    assert isinstance(backbone, RevColBackbone) and backbone.variant == "revcol_huge"
    assert backbone.level0_from_coarsest and backbone.channels == HUGE[0]
    assert backbone.subnet7.level0.fusion.up2 is not None


def test_custom_yaml_backbone_takes_the_option():
    options = dict(TINY_CONFIG)
    assert RevColBackbone("revcol", options).subnet1.level0.fusion.up2 is None
    backbone = RevColBackbone("revcol", {**options, "level0_from_coarsest": True})
    assert set(up2_parameters(TINY_CHANNELS, 2)) <= set(backbone.state_dict())
    with pytest.raises(revcol.ConfigError, match="level0_from_coarsest must be True or False"):
        RevColBackbone("revcol", {**options, "level0_from_coarsest": "yes"})


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize(("layers", "num_subnet"), [((1, 2, 1, 1), 3), ((2, 1, 1, 2), 2)])
def test_forward_matches_an_independent_reference(layers, num_subnet):
    model = make_huge_like(layers, num_subnet).eval()
    x = make_input(2, 64, 96)
    with torch.no_grad():
        expected = reference_forward(dict(model.named_parameters()), x, layers, num_subnet, 3, True)
        plain = reference_forward(dict(model.named_parameters()), x, layers, num_subnet, 3, False)
        actual = model(x)
    for a, e, p in zip(actual, expected, plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(a, p)  # the branch matters at every level (level 0 feeds the rest)


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_reversible_gradients_equal_plain_autograd(drop_path):
    model = make_huge_like(num_subnet=3, drop_path=drop_path)
    x = make_input(2, 64, 32)
    rev_out, rev = gradients(model, x, save_memory=True)
    plain_out, plain = gradients(model, x, save_memory=False)
    for a, e in zip(rev_out, plain_out, strict=True):
        assert torch.equal(a, e)
    assert_close_per_tensor(rev, plain, tol=1e-9)
    for name in up2_parameters(TINY_CHANNELS, 3):
        assert rev[name].abs().sum() > 0, name


def test_checkpoint_with_up2_loads_only_into_the_matching_wiring(tmp_path):
    source = make_huge_like(num_subnet=2).float()
    path = tmp_path / "huge_like.pth"
    buffer = io.BytesIO()
    torch.save({"model": source.state_dict()}, buffer)
    path.write_bytes(buffer.getvalue())
    target = FullNet(TINY_CHANNELS, (1, 2, 1, 1), 2, level0_from_coarsest=True)
    load_pretrained(target, path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    plain = FullNet(TINY_CHANNELS, (1, 2, 1, 1), 2)
    with pytest.raises(CheckpointError, match="up2"):
        load_pretrained(plain, path)
    torch.save(plain.state_dict(), path)
    with pytest.raises(CheckpointError, match="up2"):  # and a file without up2 does not fit RevCol-H's wiring
        load_pretrained(target, path)


# --------------------------------------------------------------------------- the published weights


def test_published_megdata_weights_come_from_the_mirror_only(monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL", raising=False)
    entries = weights.WEIGHTS["revcol_huge"]
    assert weights.DEFAULT_TAGS["revcol_huge"] == "megdata_ft_in1k"
    for entry in (e for e in entries.values() if not e.is_downstream):  # downstream: test_published_downstream.py
        assert not entry.in_release
        assert weights_cache.candidate_urls(entry) == [weights_published.MIRROR_BASE + entry.filename]
        assert entry.url == entry.mirror_url


# --------------------------------------------------------------------------- compile


def test_compiles_without_graph_breaks():
    import torch._dynamo as dynamo

    model = make_huge_like(num_subnet=3).float().eval()
    try:
        explanation = dynamo.explain(model)(make_input(1, 64, 64, dtype=torch.float32))
    finally:
        dynamo.reset()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
