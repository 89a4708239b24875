"""Loading checkpoints (docs/design.md, "Checkpoints"): layouts, strictness, damaged files, malicious pickles."""

from __future__ import annotations

import builtins
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from revcol_helpers import TINY_CHANNELS, make_net

import revcol
from revcol import CheckpointError, LoadResult, VariantSpec, load_pretrained

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HEAD_KEYS = {
    "cls.weight": torch.randn(10, 32),
    "cls.bias": torch.randn(10),
    "cls_blocks.0.norm.weight": torch.ones(32),
    "decoder_blocks.1.conv.weight": torch.randn(4, 4, 1, 1),
}


def _detector(backbone: dict) -> dict:
    return {f"backbone.{k}": v for k, v in backbone.items()}


def _assert_same_weights(a, b):
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


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
    _assert_same_weights(target, source)
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
    _assert_same_weights(target, source)
    assert set(result.skipped) == set(NECK_KEYS)


def test_top_level_backbone_wins_over_a_detector_prefix(source, target, tmp_path):
    other = make_net(num_subnet=2, dtype=torch.float32, seed=13)
    path = tmp_path / "w.pth"
    torch.save({**source.state_dict(), **_detector(other.state_dict())}, path)
    result = load_pretrained(target, path)
    _assert_same_weights(target, source)
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
    error = _raises_clear_error(target, path, "holds no RevCol backbone tensors")
    assert "backbone.stem.*" in str(error)  # says which layouts are accepted
    assert re.search(held, str(error)), str(error)


def test_legacy_serialization_and_string_path(source, target, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": source.state_dict()}, path, _use_new_zipfile_serialization=False)
    load_pretrained(target, str(path))
    _assert_same_weights(target, source)


def test_build_variant_with_pretrained(source, tmp_path, monkeypatch):
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", VariantSpec(TINY_CHANNELS, (1, 1, 1, 1), 2, 0.1))
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    model = revcol.build_variant("revcol_test", pretrained=path)
    _assert_same_weights(model, source)


def test_float64_checkpoint_loads_into_float32_model(source, target, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({k: v.double() for k, v in source.state_dict().items()}, path)
    load_pretrained(target, path)
    assert target.stem[0].weight.dtype == torch.float32
    _assert_same_weights(target, source)


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
    wider = make_net(channels=(8, 16, 24, 40), num_subnet=2, dtype=torch.float32)
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


@pytest.mark.parametrize(
    "content",
    [[torch.zeros(1)], {"model": [1, 2]}, {"stem.0.weight": torch.zeros(1), "epoch": 3}, {1: torch.zeros(1)}],
    ids=["list", "model_not_dict", "non_tensor_value", "non_string_key"],
)
def test_file_without_state_dict(content, target, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_pretrained(target, path)


# --------------------------------------------------------------------------- unreadable files


def _raises_clear_error(model, path: Path, pattern: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_pretrained(model, path)
    error = info.value
    assert str(path) in str(error)
    # not chained to a torch traceback
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


def test_missing_file(target, tmp_path):
    _raises_clear_error(target, tmp_path / "nope.pth", "not found")


def test_directory_is_not_a_checkpoint(target, tmp_path):
    _raises_clear_error(target, tmp_path, "is a directory")


def test_home_is_expanded(source, target, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    load_pretrained(target, "~/w.pth")
    _assert_same_weights(target, source)


@pytest.mark.parametrize(
    "data", [b"", b"hello world\n", b"{'stem.0.weight': 1}", b"\x00" * 64, bytes(range(256))], ids=repr
)
def test_non_checkpoint_file(data, target, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(data)
    _raises_clear_error(target, path, "not a PyTorch checkpoint")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(fraction, legacy, source, target, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(source.state_dict(), full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: max(4, int(len(data) * fraction))])
    _raises_clear_error(target, path, "truncated or corrupt|refused|not a PyTorch checkpoint")


# --------------------------------------------------------------------------- malicious pickles


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsBuiltin:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsBuiltin])
@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle", "inside_state_dict"])
def test_malicious_pickle_is_refused_and_not_executed(payload, writer, source, target, tmp_path):
    marker = tmp_path / "executed"
    evil = payload(marker)
    path = tmp_path / "evil.pth"
    if writer == "torch_save":
        torch.save(evil, path)
    elif writer == "raw_pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save({**source.state_dict(), "cls.weight": evil}, path)
    error = _raises_clear_error(target, path, "refused by weights-only loading")
    assert not marker.exists()
    assert "code that would run on load" in str(error)
    assert "In PyTorch 2.6" not in str(error)  # torch's generic advice is left out
    # the payload really is dangerous: an unrestricted unpickle would run it
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()
