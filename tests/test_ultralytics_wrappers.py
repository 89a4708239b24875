"""The wrappers the hook table puts on Ultralytics' functions (``revcol.ultralytics.wrappers``): the shipped configs
by bare name, and predict's extras (embeddings, profiling, visualisation) on the backbone's list output."""

from __future__ import annotations

import numpy as np
import torch
from helpers.yamls import TINY_RTDETR_YAML
from ultralytics import RTDETR

from revcol.ultralytics import yaml_rows
from revcol.ultralytics.backbone import RevColBackbone


def test_shipped_configs_load_by_bare_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = RTDETR("rtdetr-revcol-cpu.yaml")
    assert isinstance(model.model.model[0], RevColBackbone)
    assert {p.name for p in yaml_rows.CONFIG_DIR.glob("*.yaml")} >= {
        "rtdetr-revcol.yaml",
        "rtdetr-revcol-cpu.yaml",
        "yolo-revcol.yaml",
    }


def test_predict_extras_handle_the_list_output(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RTDETR_YAML)
    model = RTDETR(str(tmp_path / "tiny.yaml"))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    embedding = model.predict(image, imgsz=64, embed=[0], verbose=False)
    assert embedding[0].shape == (sum(model.model.model[0].width_list),)
    torch_model = model.model.eval()
    torch_model.predict(torch.zeros(1, 3, 64, 64), profile=True)
    results = model.predict(image, imgsz=64, visualize=True, verbose=False, project=str(tmp_path), name="vis")
    assert len(results) == 1
    # Ultralytics draws per-layer feature maps (older releases) or a LayerCAM picture (newer) of a RevCol model
    pictures = [p for p in (tmp_path / "vis").rglob("*") if p.suffix in {".jpg", ".png"} and p.stat().st_size]
    assert pictures
