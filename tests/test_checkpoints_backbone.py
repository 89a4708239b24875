"""A backbone's state in and out of a file (revcol.checkpoints.backbone, docs/design.md "Checkpoints"): the layouts
``read_backbone`` accepts, the strict check of ``load_pretrained`` (keys, shapes, dtypes), and the one loading
mechanism (read, check, then load) with a ``HeadRule`` for a part outside the backbone.
Writing: test_checkpoints_save.py.
"""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import torch
from helpers.checkpoints import assert_load_refused, assert_same_weights, clear_load_error
from helpers.models import TINY_CHANNELS, make_net

from revcol import CheckpointError, LoadResult, load_pretrained
from revcol.checkpoints import HeadRule

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HEAD_KEYS = {
    "cls.weight": torch.randn(10, 32),
    "cls.bias": torch.randn(10),
    "cls_blocks.0.norm.weight": torch.ones(32),
    "decoder_blocks.1.conv.weight": torch.randn(4, 4, 1, 1),
}


def _detector(backbone: dict) -> dict:
    return {f"backbone.{k}": v for k, v in backbone.items()}


LAYOUTS = {
    "plain": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": 300},
    "state_dict": lambda sd: {"state_dict": sd, "optimizer": {"lr": 0.1}},
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "model_module_prefix": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    "with_heads": lambda sd: {**sd, **HEAD_KEYS},
    "model_module_heads": lambda sd: {"model": {f"module.{k}": v for k, v in {**sd, **HEAD_KEYS}.items()}},
    # the authors' COCO detectors (mmdet): the backbone under backbone., in state_dict, beside meta
    "mmdet": lambda sd: {"meta": {"epoch": 12, "CLASSES": ("person", "car")}, "state_dict": _detector(sd)},
    "mmdet_module_prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in _detector(sd).items()}},
    "mmdet_plain": lambda sd: _detector(sd),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_from_each_layout(layout, source, target, tmp_path):
    path = tmp_path / f"{layout}.pth"
    torch.save(LAYOUTS[layout](source.state_dict()), path)
    assert not torch.equal(source.stem[0].weight, target.stem[0].weight)

    result = load_pretrained(target, path)

    assert isinstance(result, LoadResult)
    assert_same_weights(target, source)
    assert sorted(result.loaded) == sorted(source.state_dict())
    expected_skipped = set(HEAD_KEYS) if "heads" in layout else set()
    assert set(result.skipped) == expected_skipped


NECK_KEYS = {
    "neck.lateral_convs.0.conv.weight": torch.randn(4, 8, 1, 1),
    "rpn_head.rpn_cls.weight": torch.randn(3, 4, 1, 1),
    "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 16),
}


def test_detector_checkpoint_loads_its_backbone_and_skips_the_rest(source, target, tmp_path):
    path = tmp_path / "mask_rcnn_revcol.pth"
    torch.save({"state_dict": {**_detector(source.state_dict()), **NECK_KEYS}, "optimizer": {"lr": 0.02}}, path)
    result = load_pretrained(target, path)
    assert_same_weights(target, source)
    assert set(result.skipped) == set(NECK_KEYS)


def test_top_level_backbone_wins_over_a_detector_prefix(source, target, tmp_path):
    other = make_net(dtype=torch.float32, seed=13)
    path = tmp_path / "w.pth"
    torch.save({**source.state_dict(), **_detector(other.state_dict())}, path)
    result = load_pretrained(target, path)
    assert_same_weights(target, source)
    assert set(result.skipped) == set(_detector(other.state_dict()))


def test_detector_checkpoint_is_strict_too(target, tmp_path):
    three_columns = make_net(num_subnet=3, dtype=torch.float32)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": _detector(three_columns.state_dict())}, path)
    with pytest.raises(CheckpointError, match=r"does not match.*subnet2\.alpha0"):
        load_pretrained(target, path)


@pytest.mark.parametrize(
    ("content", "held"),
    [
        ({**HEAD_KEYS, "neck.conv.weight": torch.zeros(1)}, r"its 5 tensors include \[cls\.bias, cls\.weight, "),
        ({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, r"include \[backbone\.conv1\.weight\]"),
        ({}, "its state dict is empty"),
    ],
    ids=["classifier_heads_only", "other_detector_backbone", "empty"],
)
def test_file_without_revcol_backbone(content, held, target, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    error = clear_load_error(target, path, "holds no RevCol backbone tensors")
    assert "backbone.stem.*" in str(error)  # says which layouts are accepted
    assert re.search(held, str(error)), str(error)


SAFETENSORS_LAYOUTS = {
    "plain": lambda sd: sd,
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "with_heads": lambda sd: {
        **sd,
        "cls.classifier.1.weight": torch.randn(10, 32),
        "cls.classifier.1.bias": torch.randn(10),
    },
    "detector": lambda sd: {**{f"backbone.{k}": v for k, v in sd.items()}, "neck.conv.weight": torch.randn(4, 4, 1, 1)},
}


@pytest.mark.parametrize("layout", list(SAFETENSORS_LAYOUTS))
def test_load_pretrained_reads_safetensors_with_the_same_key_rules(layout, source, target, tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(SAFETENSORS_LAYOUTS[layout](source.state_dict()), path)
    result = load_pretrained(target, path)
    assert_same_weights(target, source)
    assert sorted(result.loaded) == sorted(source.state_dict())
    extra = {"with_heads": ["cls.classifier.1.bias", "cls.classifier.1.weight"], "detector": ["neck.conv.weight"]}
    assert result.skipped == extra.get(layout, [])


# --------------------------------------------------------------------------- precision


def test_float64_checkpoint_loads_into_float32_model(source, target, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({k: v.double() for k, v in source.state_dict().items()}, path)
    load_pretrained(target, path)
    assert target.stem[0].weight.dtype == torch.float32
    assert_same_weights(target, source)


def test_bfloat16_file_loads_into_a_float32_model(source, target, tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({k: v.bfloat16() for k, v in source.state_dict().items()}, path)
    load_pretrained(target, path)
    assert target.stem[0].weight.dtype == torch.float32
    for name, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[name].bfloat16().float()), name


# --------------------------------------------------------------------------- mismatches


def _unchanged(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_backbone_key_is_named(source, target, tmp_path):
    state = source.state_dict()
    del state["subnet1.level2.fusion.up.channel_reschedule.0.weight"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    before = _unchanged(target)
    with pytest.raises(CheckpointError, match=r"subnet1\.level2\.fusion\.up\.channel_reschedule\.0\.weight") as info:
        load_pretrained(target, path)
    assert isinstance(info.value, ValueError)
    assert "missing" in str(info.value)
    for k, v in target.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_extra_backbone_key_is_reported(target, tmp_path):
    three_columns = make_net(num_subnet=3, dtype=torch.float32)
    path = tmp_path / "w.pth"
    torch.save(three_columns.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"subnet2\.alpha0"):
        load_pretrained(target, path)


def test_shape_mismatch_names_key_and_both_shapes(target, tmp_path):
    wider = make_net(channels=(*TINY_CHANNELS[:-1], 40), dtype=torch.float32)
    path = tmp_path / "w.pth"
    torch.save(wider.state_dict(), path)
    before = _unchanged(target)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert "shape" in message
    key = "subnet0.alpha3"  # the first mismatching key in state-dict order
    assert key in message
    assert "(1, 40, 1, 1)" in message and "(1, 32, 1, 1)" in message
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


def test_safetensors_with_other_keys_shapes_or_dtypes_is_a_clear_error(source, target, tmp_path):
    state = source.state_dict()
    missing = {k: v for k, v in state.items() if k != "subnet1.alpha2"}
    safetensors.torch.save_file(missing, tmp_path / "missing.safetensors")
    assert_load_refused(
        target, tmp_path / "missing.safetensors", r"1 backbone tensors missing from the file \[subnet1\.alpha2\]"
    )

    extra = {**state, "subnet7.alpha0": torch.zeros(1, 8, 1, 1)}
    safetensors.torch.save_file(extra, tmp_path / "extra.safetensors")
    assert_load_refused(
        target, tmp_path / "extra.safetensors", r"1 backbone tensors the model does not have \[subnet7\.alpha0\]"
    )

    shape = {**state, "stem.0.weight": torch.zeros(8, 3, 2, 2)}
    safetensors.torch.save_file(shape, tmp_path / "shape.safetensors")
    assert_load_refused(
        target, tmp_path / "shape.safetensors", r"shape mismatch for stem\.0\.weight: checkpoint \(8, 3, 2, 2\)"
    )

    dtype = {**state, "subnet0.alpha1": torch.zeros(state["subnet0.alpha1"].shape, dtype=torch.int64)}
    safetensors.torch.save_file(dtype, tmp_path / "dtype.safetensors")
    assert_load_refused(
        target, tmp_path / "dtype.safetensors", r"dtype mismatch for subnet0\.alpha1: checkpoint torch\.int64"
    )


def test_integer_weight_in_a_torch_file_is_refused_too(source, target, tmp_path):
    state = {**source.state_dict(), "stem.1.bias": torch.zeros(TINY_CHANNELS[0], dtype=torch.int32)}
    torch.save(state, tmp_path / "w.pth")
    assert_load_refused(
        target, tmp_path / "w.pth", r"dtype mismatch for stem\.1\.bias: checkpoint torch\.int32, model torch\.float32"
    )


# --------------------------------------------------------------------------- a part outside the backbone


def _with_head(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a Linear ``head`` beside its columns, where a classifier keeps its head."""
    model.head = torch.nn.Linear(TINY_CHANNELS[-1], 3)
    return model


def _fc_for_head(state, own, path) -> dict[str, str]:
    """A ``HeadRule.pick``: the file's ``fc.*`` tensors fill the head."""
    return {f"fc.{k}": k for k in own if f"fc.{k}" in state}


def test_a_head_rule_loads_a_part_outside_the_backbone(source, tmp_path):
    fc = torch.nn.Linear(TINY_CHANNELS[-1], 3)
    path = tmp_path / "w.pth"
    head = {f"fc.{k}": v for k, v in fc.state_dict().items()}
    torch.save({**source.state_dict(), **head, "aux.weight": torch.ones(1)}, path)
    model = _with_head(make_net(dtype=torch.float32, seed=12, randomize=False))
    with pytest.raises(CheckpointError, match=r"2 backbone tensors missing from the file \[head\.bias, head\.weight\]"):
        load_pretrained(model, path)  # without a rule the head is one more part the file must hold
    result = load_pretrained(model, path, HeadRule("head.", _fc_for_head))
    assert torch.equal(model.head.weight, fc.weight) and torch.equal(model.head.bias, fc.bias)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    assert result.loaded == [*source.state_dict(), "head.weight", "head.bias"]
    assert result.skipped == ["aux.weight"]


def test_a_head_rule_that_refuses_leaves_the_backbone_unloaded_too(source, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = _with_head(make_net(dtype=torch.float32, seed=12, randomize=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def refuse(state, own, where):
        assert set(own) == {"weight", "bias"} and where == path  # the part's own state, without its prefix
        raise CheckpointError(f"{where}: no head here")

    with pytest.raises(CheckpointError, match="no head here"):
        load_pretrained(model, path, HeadRule("head.", refuse))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # checked first, copied after
