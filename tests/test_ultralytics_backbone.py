"""``RevColBackbone``, the layer a YAML row becomes (``revcol.ultralytics.backbone``): its options (``lr_decay``
among them), its input checks and its summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import TINY_CONFIG
from helpers.plugin import rtdetr_dict, tiny_rtdetr
from helpers.yamls import TINY_OPTIONS, backbone_with, write_yaml
from ultralytics import RTDETR, YOLO
from ultralytics.nn import tasks

import revcol
from revcol import ConfigError, RevColBackbone


def test_options_reach_the_backbone():
    backbone = tiny_rtdetr(save_memory=False, drop_path=0.2, kernel_size=5).model[0]
    assert backbone.save_memory is False and backbone.drop_path == 0.2 and backbone.kernel_size == 5
    assert backbone.width_list == TINY_OPTIONS["channels"]


def test_pretrained_option_loads_authors_layout(tmp_path):
    reference = revcol.FullNet(**TINY_CONFIG)
    state = {f"module.{k}": v.clone().normal_() for k, v in reference.state_dict().items()}
    state["module.cls.classifier.weight"] = torch.zeros(10, 32)
    path = tmp_path / "authors.pth"
    torch.save({"model": state, "epoch": 300}, path)
    backbone = tiny_rtdetr(pretrained=str(path)).model[0]
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"module.{key}"], rtol=0, atol=0)


def test_numpy_integers_work_wherever_ints_do():
    options = {
        "channels": [np.int64(c) for c in TINY_OPTIONS["channels"]],
        "layers": [np.int32(v) for v in TINY_OPTIONS["layers"]],
        "num_subnet": np.int64(TINY_OPTIONS["num_subnet"]),
        "kernel_size": np.int16(5),
    }
    backbone = tasks.RTDETRDetectionModel(rtdetr_dict("revcol", options), verbose=False).model[0]
    assert (backbone.channels, backbone.num_subnet) == (TINY_CONFIG["channels"], TINY_CONFIG["num_subnet"])
    assert backbone.kernel_size == 5
    assert all(type(c) is int for c in backbone.width_list)


def test_empty_image_through_the_ultralytics_model_is_an_input_error():
    model = tiny_rtdetr().eval()
    with pytest.raises(revcol.InputError, match=r"positive multiples of 32 .*got 0x64"):
        model.predict(torch.zeros(1, 3, 0, 64))


def test_info_reports_gflops():
    # 96 px: the config's 100 queries need that many anchors (Ultralytics before 8.4.146 does not cap them)
    _, _, _, flops = RTDETR("rtdetr-revcol-cpu.yaml").model.info(imgsz=96)
    assert flops > 0


@pytest.mark.parametrize("rate", [0.85, 1, 0.01])
def test_lr_decay_option_is_stored_on_the_backbone(rate):
    backbone = RevColBackbone("revcol", {**TINY_OPTIONS, "lr_decay": rate})
    assert backbone.lr_decay == rate and isinstance(backbone.lr_decay, float)
    assert RevColBackbone("revcol", TINY_OPTIONS).lr_decay is None


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, "0.85", True, None])
def test_lr_decay_must_be_a_number_in_0_1(rate, tmp_path):
    if rate is None:  # YAML's null: the option given without a value
        yaml = write_yaml(tmp_path, "detect", backbone_with("lr_decay: null"))
        assert YOLO(yaml).model.model[0].lr_decay is None
        return
    with pytest.raises(ConfigError, match=r"lr_decay must be a number in \(0, 1\]"):
        RevColBackbone("revcol_tiny", {"lr_decay": rate})  # refused before the network is built
