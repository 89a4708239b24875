"""The YAML row that names a backbone (``revcol.ultralytics.yaml_rows``): the layers it expands to, its checks, the
shipped configs."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.plugin import SEED_YAML, rtdetr_dict
from helpers.processes import revcol_env
from helpers.yamls import TINY_OPTIONS
from ultralytics.nn import tasks
from ultralytics.nn.modules import Index

import revcol
from revcol.ultralytics.backbone import RevColBackbone


def test_shipped_rtdetr_config_is_the_design_doc_reference_verbatim():
    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    section = design.split("## YAML contract", 1)[1].split("\n## ", 1)[0]
    reference = section.split("```yaml\n")[-1].split("```", 1)[0]
    assert "\nnc: 80" in reference and "RTDETRDecoder" in reference
    assert SEED_YAML.read_text() == reference


@pytest.mark.parametrize("variant", list(revcol.VARIANTS))
def test_seed_yaml_layer_layout_for_every_variant(variant):
    d = rtdetr_dict(variant)
    with torch.device("meta"):
        model = tasks.RTDETRDetectionModel(d, verbose=False)
    layers = model.model
    spec = revcol.VARIANTS[variant]
    assert isinstance(layers[0], RevColBackbone) and layers[0].variant == variant
    assert layers[0].channels == spec.channels and layers[0].num_subnet == spec.num_subnet
    for level in range(4):
        assert isinstance(layers[level + 1], Index) and layers[level + 1].index == level
        assert layers[level + 1].f == 0
    # head rows 5, 9 and 14 read P5, P4 and P3 (indexes -1=4, 3 and 2): their convs see those widths
    assert layers[5].conv.in_channels == spec.channels[3]
    assert layers[9].conv.in_channels == spec.channels[2]
    assert layers[14].conv.in_channels == spec.channels[1]
    assert len(layers) == 24 and layers[5].i == 5


def test_yolo_config_builds_with_detect_head():
    with torch.device("meta"):
        d = tasks.yaml_model_load("yolo-revcol.yaml")
    model = tasks.DetectionModel(d, verbose=False)
    assert isinstance(model.model[0], RevColBackbone)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_the_yaml_contract_imports_no_ultralytics():
    source = (Path(revcol.__file__).parent / "ultralytics" / "yaml_rows.py").read_text()
    tree = ast.parse(source)
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] in {"ultralytics", "torch", "timm"} for m in modules), modules


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("revcol_giant", [], r"unknown RevCol backbone 'revcol_giant'.*revcol_small"),
        ("revcol_small", [{"pretrained": "x.pth", "dropout": 0.1}], r"unknown option\(s\) \['dropout'\]"),
        ("revcol_small", ["x.pth", True], r"takes \[\] or one mapping of options"),
        ("revcol_tiny", [{"drop_path": 1.5}], r"drop_path must be a number in \[0, 1\)"),
        ("revcol", [{"channels": TINY_OPTIONS["channels"]}], r"needs channels, layers and num_subnet"),
        ("revcol", [], r"needs channels, layers and num_subnet; missing \['channels', 'layers', 'num_subnet'\]"),
        ("revcol", None, r"missing \['channels', 'layers', 'num_subnet'\]"),
        ("revcol", [{}], r"missing \['channels', 'layers', 'num_subnet'\]"),
        (
            "revcol",
            [{"layers": TINY_OPTIONS["layers"], "num_subnet": TINY_OPTIONS["num_subnet"]}],
            r"missing \['channels'\] \(e\.g\. \[-1, 1, revcol",
        ),
        ("revcol_tiny", [{"pretrained": "does/not/exist.pth"}], r"checkpoint not found"),
        ("revcol_tiny", [{"save_memory": "False"}], r"save_memory must be True or False, got 'False'"),
        ("revcol_tiny", [{"kernel_size": True}], r"kernel_size must be a positive odd int, got True"),
        ("revcol_tiny", [{"drop_path": "0.1"}], r"drop_path must be a number in \[0, 1\), got '0.1'"),
    ],
)
def test_bad_backbone_rows_fail_clearly(name, args, match):
    d = rtdetr_dict()
    d["backbone"][0] = [-1, 1, name, args]
    with pytest.raises(revcol.RevColError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize("row", [[-1, 1, "revcol"], [-1, 1, "revcol_tiny"], [-1, 1, "revcol_tiny", [], 5]])
def test_a_revcol_row_of_other_than_four_items_is_a_config_error(row):
    d = rtdetr_dict()
    d["backbone"][0] = row
    with pytest.raises(revcol.ConfigError, match=rf"has four items.*got {len(row)}"):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ([9, 1, "Conv", [256, 1, 1]], r"layer 5 .* takes input from layer 9, which does not exist"),
        ([0, 1, "Conv", [256, 1, 1]], r"takes the backbone's list output \(layer 0\); use 1-4"),
    ],
)
def test_head_index_outside_the_backbone_slots_fails_clearly(row, match):
    d = rtdetr_dict("revcol", TINY_OPTIONS)
    d["head"][0] = row
    with pytest.raises(ValueError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize("where", ["head", "backbone"])
def test_revcol_row_outside_the_first_backbone_row_names_the_row(where):
    d = rtdetr_dict("revcol", TINY_OPTIONS)
    d[where].insert(1, [-1, 1, "revcol_tiny", []])
    match = rf"first backbone row .*found at {where} row 1 \[-1, 1, 'revcol_tiny'"
    with pytest.raises(revcol.ConfigError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


def test_revcol_row_in_the_head_of_a_non_revcol_backbone_is_a_config_error():
    d = rtdetr_dict("revcol", TINY_OPTIONS)
    d["backbone"] = [[-1, 1, "Conv", [16, 3, 2]]]
    d["head"] = [[-1, 1, "revcol_small", []]]
    with pytest.raises(revcol.ConfigError, match=r"found at head row 0"):
        tasks.RTDETRDetectionModel(d, verbose=False)


def test_model_dict_is_not_modified_by_expansion():
    d = rtdetr_dict("revcol", TINY_OPTIONS)
    before = copy.deepcopy(d)
    model = tasks.RTDETRDetectionModel(d, verbose=False)
    assert model.yaml["backbone"] == before["backbone"]


# sha256 (first 16 hex digits) of "name shape" per state-dict entry, and the entry count, of each shipped config as
# built before the hook table and the YAML contract moved (the same on Ultralytics 8.4.67 and 8.4.190).
SHIPPED_STATE = {
    "rtdetr-revcol-cpu.yaml": ("2de7c91dc64dab2c", 389),
    "rtdetr-revcol-demo.yaml": ("85bbdd208b8c9062", 389),
    "rtdetr-revcol.yaml": ("98f62a84ece7cda3", 1331),
    "yolo-revcol-cls.yaml": ("e6ebde4bb33c141a", 472),
    "yolo-revcol-obb.yaml": ("87b666e40408e804", 711),
    "yolo-revcol-pose.yaml": ("cb3fc9eae3fe2b8d", 711),
    "yolo-revcol-seg.yaml": ("8b6d50c806372e65", 731),
    "yolo-revcol.yaml": ("bfd0974f309a46af", 669),
}


# A fresh interpreter: what earlier tests did to Ultralytics' state in this one (8.4.67 keeps some) cannot leak in.
STATE_OF_SHIPPED = """
import hashlib, json, sys
import revcol
from ultralytics.nn import tasks

classes = {"RTDETRDecoder": tasks.RTDETRDetectionModel, "Classify": tasks.ClassificationModel,
           "Segment": tasks.SegmentationModel, "Pose": tasks.PoseModel, "OBB": tasks.OBBModel,
           "Detect": tasks.DetectionModel}
out = {}
for config in sys.argv[1:]:
    d = tasks.yaml_model_load(config)
    state = classes[d["head"][-1][2]](d, verbose=False).state_dict()
    text = "\\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    out[config] = [hashlib.sha256(text.encode()).hexdigest()[:16], len(state)]
print(json.dumps(out))
"""


def test_shipped_configs_build_the_same_models_as_before(tmp_path):

    command = [sys.executable, "-c", STATE_OF_SHIPPED, *SHIPPED_STATE]
    out = subprocess.run(command, cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    built = {k: tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert built == SHIPPED_STATE
