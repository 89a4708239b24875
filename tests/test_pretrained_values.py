"""What a ``pretrained=`` value names, and loading it (revcol.weights.pretrained): ``choose_pretrained`` decides, from
the table alone and before anything is built, a published file or a path and the kernel size that implies;
``load_chosen`` loads it. Every entry point takes that one path: ``build_variant``, a model-YAML row
(``RevColBackbone``), timm, and ``revcol download`` for the published files.

The authors' downstream files (COCO, ADE20K, the k7-padded RevCol-H) are gigabytes; here a small fake variant has
files in the same layouts (mmdetection's and mmsegmentation's ``{"meta": ..., "state_dict": {"backbone.*": ...}}``),
served by a local server on 127.0.0.1. The ImageNet files: test_weights_published.py; downloads: test_weights_cache.py.
"""

from __future__ import annotations

import io
import socket
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from helpers.checkpoints import assert_same_weights
from helpers.models import TINY_SPEC, make_net
from helpers.server import WeightsServer
from helpers.yamls import TINY_RTDETR_YAML

import revcol
from revcol import CheckpointError, ConfigError, FullNet, timm_models
from revcol.checkpoints.backbone import read_backbone
from revcol.ultralytics import yaml_rows as contract
from revcol.weights import cache as weights_cache
from revcol.weights import pretrained
from revcol.weights.pretrained import PretrainedChoice, choose_pretrained, load_chosen, pretrained_kernel_size
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

COCO = "COCO detection, Cascade Mask R-CNN 3x (mmdetection)"
ADE = "ADE20K segmentation, UperNet 160k (mmsegmentation)"


# --------------------------------------------------------------------------- the decision


@pytest.mark.usefixtures("no_network")
def test_choose_pretrained_names_nothing_a_published_file_or_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert choose_pretrained("revcol_tiny", None, 5) == PretrainedChoice(kernel_size=5)
    assert choose_pretrained("revcol_tiny", False) == PretrainedChoice()
    default = WEIGHTS["revcol_tiny"][DEFAULT_TAGS["revcol_tiny"]]
    assert choose_pretrained("revcol_tiny", True) == PretrainedChoice(entry=default, kernel_size=3)
    k7 = WEIGHTS["revcol_huge"]["megdata_k7"]
    assert choose_pretrained("revcol_huge", "megdata_k7", 7) == PretrainedChoice(entry=k7, kernel_size=7)
    assert choose_pretrained(None, "~/w.pth", 5) == PretrainedChoice(path=tmp_path / "w.pth", kernel_size=5)
    assert choose_pretrained("revcol_tiny", Path("in1k")) == PretrainedChoice(path=Path("in1k"))  # a Path: a file
    with pytest.raises(CheckpointError, match="no published weights exist for a custom RevCol configuration"):
        choose_pretrained(None, True)


def test_load_chosen_loads_through_the_given_loader_and_nothing_for_nothing(source, target, tmp_path):
    def never(model, path):
        raise AssertionError(f"nothing is to be loaded, yet {path} was")

    assert load_chosen(target, PretrainedChoice(kernel_size=7), never) is None
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    calls = []
    assert load_chosen(target, PretrainedChoice(path=path), lambda m, p: calls.append((m, p)) or "done") == "done"
    assert calls == [(target, path)]
    result = load_chosen(target, choose_pretrained(None, str(path)))  # default loader: load_pretrained
    assert sorted(result.loaded) == sorted(source.state_dict())
    assert_same_weights(target, source)


def test_the_k7_tags_imply_kernel_size_7_without_building_or_the_network():
    assert pretrained_kernel_size("revcol_huge", "megdata_k7", None) == 7
    assert pretrained_kernel_size("revcol_huge", "megdata_ft_ade20k", 7) == 7
    assert pretrained_kernel_size("revcol_huge", True, None) == 3
    assert pretrained_kernel_size("revcol_huge", None, 5) == 5
    with pytest.raises(ConfigError, match=r"have 7x7 depthwise kernels, so kernel_size must be 7 .*got 3"):
        pretrained_kernel_size("revcol_huge", "megdata_k7", 3)


# --------------------------------------------------------------------------- a path, through every entry point


def test_build_variant_with_pretrained(source, tmp_path, monkeypatch):
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", TINY_SPEC)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    model = revcol.build_variant("revcol_test", pretrained=path)
    assert_same_weights(model, source)


def test_build_variant_and_yaml_option_read_safetensors(source, tmp_path, monkeypatch):
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", TINY_SPEC)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    assert_same_weights(revcol.build_variant("revcol_test", pretrained=path), source)
    backbone = revcol.RevColBackbone("revcol_test", {"pretrained": str(path)})
    assert_same_weights(backbone, source)


# --------------------------------------------------------------------------- published files in the authors' layouts

FAKE = "fake_revcol_downstream"  # not revcol*: timm keeps registrations, and test_timm_models lists revcol* models
FAKE_SPEC = TINY_SPEC
COCO_ENTRY = PublishedWeights(FAKE, "in1k_ft_coco", "cmr_fake_3x.pth", 800, None, None, False, "detection", COCO)
ADE_ENTRY = PublishedWeights(
    FAKE, "megdata_ft_ade20k", "upernet_fake.pth", 640, None, None, False, "segmentation", ADE, kernel_size=7
)
K7_ENTRY = PublishedWeights(FAKE, "megdata_k7", "fake_k7padded.pth", 224, None, None, False, "segmentation", "k7")
K7_ENTRY = PublishedWeights(**{**K7_ENTRY.__dict__, "kernel_size": 7})

# What mmcv's save_checkpoint writes into "meta" (plain types only), and an optimizer state beside the weights.
MMDET_META = {
    "mmdet_version": "2.25.0+3e26931",
    "CLASSES": ("person", "bicycle", "car"),
    "env_info": "sys.platform: linux\nPython: 3.8.13\nCUDA available: True",
    "config": "model = dict(type='CascadeRCNN', backbone=dict(type='RevCol', channels=[64, 128, 256, 512]))",
    "seed": 0,
    "exp_name": "cascade_mask_rcnn_revcol_tiny_3x_in1k.py",
    "epoch": 36,
    "iter": 263808,
    "mmcv_version": "1.6.0",
    "time": "Fri Dec 16 03:10:41 2022",
    "hook_msgs": {"last_ckpt": "work_dirs/epoch_36.pth"},
    "fp16": {"loss_scaler": {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}},
}
MMSEG_META = {
    **{k: v for k, v in MMDET_META.items() if k not in {"mmdet_version", "epoch"}},
    "mmseg_version": "0.24.1",
    "CLASSES": ("wall", "building", "sky"),
    "PALETTE": [[120, 120, 120], [180, 120, 120], [6, 230, 230]],
}


def _save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _backbones() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "coco": make_net(dtype=torch.float32, seed=7).state_dict(),
        "ade": make_net(kernel_size=7, dtype=torch.float32, seed=8).state_dict(),
        "k7": make_net(kernel_size=7, dtype=torch.float32, seed=9).state_dict(),
    }


def _files(backbones: dict[str, dict[str, torch.Tensor]]) -> dict[str, bytes]:
    detector = {f"backbone.{k}": v for k, v in backbones["coco"].items()}
    detector |= {
        "neck.lateral_convs.0.conv.weight": torch.randn(256, 8, 1, 1),
        "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3),
        "roi_head.bbox_head.0.fc_cls.weight": torch.randn(81, 1024),
        "roi_head.mask_head.0.conv_logits.weight": torch.randn(80, 256, 1, 1),
    }
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
        "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}],
    }
    segmenter = {f"backbone.{k}": v for k, v in backbones["ade"].items()}
    segmenter |= {
        "decode_head.conv_seg.weight": torch.randn(3, 512, 1, 1),
        "auxiliary_head.conv_seg.bias": torch.zeros(3),
    }
    return {
        COCO_ENTRY.filename: _save({"meta": MMDET_META, "state_dict": detector, "optimizer": optimizer}),
        ADE_ENTRY.filename: _save({"meta": MMSEG_META, "state_dict": segmenter}),
        K7_ENTRY.filename: _save(backbones["k7"]),
    }


@pytest.fixture
def downstream(server, tmp_path, monkeypatch) -> tuple[WeightsServer, dict[str, dict[str, torch.Tensor]]]:
    monkeypatch.setitem(revcol.VARIANTS, FAKE, FAKE_SPEC)
    monkeypatch.setitem(WEIGHTS, FAKE, {e.tag: e for e in (COCO_ENTRY, ADE_ENTRY, K7_ENTRY)})
    monkeypatch.setitem(DEFAULT_TAGS, FAKE, COCO_ENTRY.tag)
    monkeypatch.setattr(contract, "BACKBONE_NAMES", contract.BACKBONE_NAMES | {FAKE})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)
    backbones = _backbones()
    for filename, data in _files(backbones).items():
        server.files[f"/weights/{filename}"] = (data, "ok")
    return server, backbones


TAGS = [("in1k_ft_coco", "coco", 3), ("megdata_ft_ade20k", "ade", 7), ("megdata_k7", "k7", 7)]


def _assert_backbone(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls.")}
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_a_realistic_mmdet_meta_passes_weights_only_loading(downstream, tmp_path):
    server, backbones = downstream
    path = tmp_path / "cmr.pth"
    path.write_bytes(server.files[f"/weights/{COCO_ENTRY.filename}"][0])
    state = read_backbone(path)
    assert all(torch.equal(state[k], v) for k, v in backbones["coco"].items())
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta == MMDET_META


@pytest.mark.parametrize(("tag", "which", "kernel"), TAGS)
def test_python_loads_the_backbone_of_each_layout(tag, which, kernel, downstream):
    server, backbones = downstream
    model = revcol.build_variant(FAKE, pretrained=tag)
    assert model.kernel_size == kernel
    _assert_backbone(model, backbones[which])
    assert server.requests == {f"/weights/{WEIGHTS[FAKE][tag].filename}": 1}


@pytest.mark.parametrize(("tag", "which", "kernel"), TAGS)
def test_a_yaml_row_loads_the_backbone_by_tag(tag, which, kernel, downstream):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    _, backbones = downstream
    d = yaml.safe_load(TINY_RTDETR_YAML)
    d["backbone"][0] = [-1, 1, FAKE, [{"pretrained": tag}]]
    backbone = RTDETRDetectionModel(d, verbose=False).model[0]
    assert backbone.kernel_size == kernel
    _assert_backbone(backbone, backbones[which])


@pytest.mark.parametrize(("tag", "which", "kernel"), TAGS)
def test_timm_loads_the_backbone_by_tag(tag, which, kernel, downstream):
    _, backbones = downstream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is registered again (an earlier test)
        timm_models.register(FAKE)
    assert f"{FAKE}.{tag}" in timm.list_pretrained(f"{FAKE}*")
    model = timm.create_model(f"{FAKE}.{tag}", pretrained=True)
    assert model.kernel_size == kernel and model.num_classes == 0  # a headless model: the file has no classifier
    _assert_backbone(model, backbones[which])


@pytest.mark.parametrize("entry_point", ["yaml", "timm"])
def test_a_value_is_decided_once_and_what_was_decided_is_loaded(entry_point, downstream, monkeypatch):
    """The kernel size a tag implies and the file loaded come from one decision, not two look-ups of the table."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    _, backbones = downstream
    looked_up = []
    real = pretrained.named_entry
    monkeypatch.setattr(pretrained, "named_entry", lambda *args: looked_up.append(args) or real(*args))
    if entry_point == "yaml":
        d = yaml.safe_load(TINY_RTDETR_YAML)
        d["backbone"][0] = [-1, 1, FAKE, [{"pretrained": "megdata_k7"}]]
        model = RTDETRDetectionModel(d, verbose=False).model[0]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm warns when a name is registered again (an earlier test)
            timm_models.register(FAKE)
        model = timm.create_model(f"{FAKE}.megdata_k7", pretrained=True)
    assert looked_up == [(FAKE, "megdata_k7")]
    assert model.kernel_size == 7
    _assert_backbone(model, backbones["k7"])


def test_revcol_download_fetches_checks_and_prints_each_tag(downstream, capsys):
    from revcol.cli import main

    server, _ = downstream
    for tag, _, _ in TAGS:
        assert main(["download", FAKE, tag]) == 0
        assert capsys.readouterr().out.strip() == str(weights_cache.cache_path(WEIGHTS[FAKE][tag]))
    assert main(["info", FAKE]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.split("\n\n")[-1].splitlines() if line.startswith(FAKE)]
    assert [(row[1], row[2], row[-2], row[-1]) for row in rows] == [
        ("in1k_ft_coco", "cmr_fake_3x.pth", "3", "yes"),
        ("megdata_ft_ade20k", "upernet_fake.pth", "7", "yes"),
        ("megdata_k7", "fake_k7padded.pth", "7", "yes"),
    ]
    assert len(server.requests) == 3 and set(server.requests.values()) == {1}


def test_an_explicit_kernel_size_that_contradicts_the_tag_fails_before_building(downstream, monkeypatch):
    server, _ = downstream
    entered = _spy_fullnet(monkeypatch)
    with pytest.raises(ConfigError, match="kernel_size must be 7"):
        revcol.build_variant(FAKE, pretrained="megdata_k7", kernel_size=3)
    assert entered == [] and server.requests == {}


# --------------------------------------------------------------------------- no published weights: before building


def _spy_fullnet(monkeypatch) -> list[tuple]:
    """Records every FullNet.__init__ (RevColBackbone and timm's RevColClassifier run it too)."""
    entered: list[tuple] = []
    original = FullNet.__init__

    def spy(self, *args, **kwargs):
        entered.append((type(self).__name__, kwargs.get("channels")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(FullNet, "__init__", spy)
    return entered


@pytest.fixture
def no_network(monkeypatch):
    real = socket.socket.connect

    def refuse(self, address):
        raise AssertionError(f"the test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    monkeypatch.setattr(socket.socket, "connect", real)


def _xlarge_yaml(pretrained: object) -> dict:
    d = yaml.safe_load(TINY_RTDETR_YAML)
    d["backbone"][0] = [-1, 1, "revcol_xlarge", [{"pretrained": pretrained}]]
    return d


BUILDERS = {
    "python_true": lambda: revcol.revcol_xlarge(pretrained=True),
    "python_tag": lambda: revcol.build_variant("revcol_xlarge", pretrained="in22k"),
    "python_unknown_tag": lambda: revcol.revcol_tiny(pretrained="in22k"),
    "yaml_true": lambda: __import__("ultralytics").nn.tasks.RTDETRDetectionModel(_xlarge_yaml(True), verbose=False),
    "yaml_tag": lambda: __import__("ultralytics").nn.tasks.RTDETRDetectionModel(_xlarge_yaml("in1k"), verbose=False),
    "timm": lambda: timm.create_model("revcol_xlarge", pretrained=True),
}


@pytest.mark.parametrize("how", BUILDERS)
@pytest.mark.usefixtures("no_network")
def test_no_published_weights_is_decided_before_anything_is_built(how, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    entered = _spy_fullnet(monkeypatch)
    with pytest.raises(CheckpointError, match="no published weights"):
        BUILDERS[how]()
    assert entered == []  # FullNet.__init__ was never entered: no 832 M parameters for nothing
