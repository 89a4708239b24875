"""The offline demo (``revcol.demo``): its synthetic shapes dataset, its pieces and a shortened ``revcol demo`` run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers.plugin import tiny_rtdetr
from helpers.processes import revcol_env

from revcol.demo.run import PICTURE_SIZE, annotate, available_cores, denoising_queries, offline, training_threads
from revcol.demo.shapes import CLASSES, MAX_SHAPES, generate_dataset

REVCOL = Path(sys.executable).with_name("revcol")
# Share of a shape's box painted in the shape's colour, per class.
FILL = {"circle": (0.68, 0.86), "square": (1.0, 1.0), "triangle": (0.45, 0.62)}


def read_labels(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=float).reshape(-1, 5)


def pixel_boxes(labels: np.ndarray, imgsz: int) -> list[tuple[int, int, int, int, int]]:
    """(class, x0, y0, x1, y1) with exclusive ends, in pixels."""
    boxes = []
    for c, cx, cy, w, h in labels:
        x0, y0 = round((cx - w / 2) * imgsz), round((cy - h / 2) * imgsz)
        boxes.append((int(c), x0, y0, x0 + round(w * imgsz), y0 + round(h * imgsz)))
    return boxes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes"), n_train=24, n_val=6, imgsz=96, seed=3, n_test=5)


def test_layout_and_data_yaml(dataset):
    data = yaml.safe_load(dataset.read_text())
    root = Path(data["path"])
    assert root == dataset.parent
    assert data["names"] == dict(enumerate(CLASSES))
    for split, count in {"train": 24, "val": 6, "test": 5}.items():
        assert data[split] == f"images/{split}"
        images = sorted((root / "images" / split).glob("*.png"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]


def test_labels_match_the_drawn_shapes(dataset):
    root = dataset.parent
    seen = set()
    for image_path in sorted(root.glob("images/*/*.png")):
        image = cv2.imread(str(image_path))
        assert image.shape == (96, 96, 3)
        labels = read_labels(root / "labels" / image_path.parent.name / f"{image_path.stem}.txt")
        assert 1 <= len(labels) <= MAX_SHAPES
        assert ((labels[:, 1:] > 0) & (labels[:, 1:] <= 1)).all()
        covered = np.zeros(image.shape[:2], bool)
        for c, x0, y0, x1, y1 in pixel_boxes(labels, 96):
            seen.add(c)
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert not covered[y0:y1, x0:x1].any(), "label boxes overlap"
            covered[y0:y1, x0:x1] = True
            crop = image[y0:y1, x0:x1]
            colour = image[(y0 + y1) // 2, (x0 + x1) // 2]  # the centre of every shape is painted
            painted = (crop == colour).all(axis=2)
            low, high = FILL[CLASSES[c]]
            assert low <= painted.mean() <= high, (image_path, CLASSES[c], painted.mean())
            # tight box: the shape touches all four sides
            assert painted[0].any() and painted[-1].any() and painted[:, 0].any() and painted[:, -1].any()
            # the shape's colour is bright; the background never is
            assert colour.max() >= 200
        bright = image.max(axis=2) >= 190
        assert not (bright & ~covered).any(), f"{image_path}: a shape is drawn without a label"
    assert seen == set(range(len(CLASSES)))


def test_same_seed_same_files(tmp_path):
    a = generate_dataset(tmp_path / "a", n_train=3, n_val=2, imgsz=64, seed=7)
    b = generate_dataset(tmp_path / "b", n_train=3, n_val=2, imgsz=64, seed=7)
    c = generate_dataset(tmp_path / "c", n_train=3, n_val=2, imgsz=64, seed=8)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*.*") if p.name != "data.yaml")
    assert len(files) == 2 * (3 + 2 + 2)
    assert all((a.parent / f).read_bytes() == (b.parent / f).read_bytes() for f in files)
    assert any((a.parent / f).read_bytes() != (c.parent / f).read_bytes() for f in files)


@pytest.mark.parametrize("kwargs", [{"imgsz": 16}, {"n_train": 0}, {"n_val": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, **{"n_train": 2, "n_val": 1, "imgsz": 64, "seed": 0, **kwargs})


def test_offline_block(tmp_path, monkeypatch):
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import checks, events, plotting

    monkeypatch.setattr(checks, "USER_CONFIG_DIR", tmp_path)  # no Arial.ttf there

    def state():
        return checks.check_font, data_utils.check_font, plotting.check_font, checks.ONLINE, events.events.enabled

    before = state()
    with offline():
        font = plotting.check_font("Arial.ttf")
        assert font is not None and font.name == "DejaVuSans.ttf" and font.is_file()
        assert data_utils.check_font("Arial.Unicode.ttf") == font
        assert checks.ONLINE is False and events.events.enabled is False
        (tmp_path / "Arial.ttf").write_bytes(font.read_bytes())
        assert checks.check_font("Arial.ttf") == tmp_path / "Arial.ttf"  # a font already there is used
    assert state() == before


def test_annotate_keeps_the_most_confident_of_overlapping_boxes_and_needs_no_font(monkeypatch):
    from ultralytics.engine.results import Results
    from ultralytics.utils import checks, plotting

    def no_font(*args, **kwargs):
        raise AssertionError("a font was looked up")

    monkeypatch.setattr(checks, "check_font", no_font)
    monkeypatch.setattr(plotting, "check_font", no_font)
    image = np.full((64, 64, 3), 60, np.uint8)
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0, 0.80, 1.0],
            [11.0, 11.0, 31.0, 31.0, 0.90, 1.0],  # IoU 0.82 with the first: only this one is drawn
            [40.0, 40.0, 60.0, 60.0, 0.70, 2.0],
        ]
    )
    result = Results(image, "000000.png", dict(enumerate(CLASSES)), boxes=boxes)
    with mock.patch.object(Results, "plot", autospec=True, side_effect=Results.plot) as plot:
        picture = annotate(result)
    assert picture.shape == (PICTURE_SIZE, PICTURE_SIZE, 3) and picture.dtype == np.uint8
    assert plot.call_count == 1
    drawn = plot.call_args.args[0]  # the Results that was plotted
    assert drawn.orig_img.shape == picture.shape  # drawn at picture size, not drawn small and blown up
    scale = PICTURE_SIZE / 64
    assert torch.allclose(drawn.boxes.xyxy, boxes[[1, 2], :4] * scale)
    assert drawn.boxes.conf.tolist() == pytest.approx([0.9, 0.7]) and drawn.boxes.cls.tolist() == [1, 2]
    assert (picture != cv2.resize(image, (PICTURE_SIZE, PICTURE_SIZE))).any()  # something was drawn
    assert (result.orig_img == 60).all()  # the result's own image is left as it was


def test_training_threads_use_every_core_only_without_loader_workers():
    assert training_threads("cpu", workers=0) == available_cores() >= 1
    assert training_threads("CPU", workers=0) == available_cores()
    assert training_threads("cpu", workers=2) is None  # Ultralytics leaves a core to its loader workers
    assert training_threads("0", workers=0) is None  # a GPU: Ultralytics' setting


def test_denoising_queries_hold_for_the_block_only():
    model = tiny_rtdetr()
    decoder = model.model[-1]
    before = decoder.num_denoising
    with pytest.raises(RuntimeError, match="inside"), denoising_queries(model, 3):
        assert decoder.num_denoising == 3 and vars(type(decoder)).get("num_denoising") is None  # this decoder only
        raise RuntimeError("inside")
    assert decoder.num_denoising == before
    with pytest.raises(ValueError, match=r"must be >= 0, got -1"), denoising_queries(model, -1):
        pass
    with pytest.raises(ValueError, match=r"need an RT-DETR model"), denoising_queries(torch.nn.Linear(2, 2), 3):
        pass


def test_shortened_demo_writes_every_promised_output(tmp_path):
    out = tmp_path / "demo-out"
    command = [str(REVCOL), "demo", "--output", str(out), "--epochs", "1", "--imgsz", "64", "--batch", "4"]
    command += ["--train-images", "8", "--val-images", "4", "--test-images", "5"]
    run = subprocess.run(command, cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    assert not (tmp_path / "network.log").exists(), (tmp_path / "network.log").read_text()
    data = yaml.safe_load((out / "dataset" / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CLASSES))
    assert len(list((out / "dataset" / "images" / "train").glob("*.png"))) == 8
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml"):
        assert (out / "train" / name).is_file(), name
    for name in ("confusion_matrix.png", "BoxPR_curve.png", "val_batch0_pred.jpg"):
        assert (out / "test" / name).is_file(), name
    predictions = sorted((out / "predictions").glob("*.jpg"))
    assert [p.stem for p in predictions] == [f"{i:06d}" for i in range(5)]
    picture = cv2.imread(str(predictions[0]))
    assert picture.shape == (256, 256, 3)
    grid = cv2.imread(str(out / "predictions.jpg"))
    assert grid is not None and grid.shape[1] > grid.shape[0] > 256

    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["map50"] <= 1.0 and 0.0 <= summary["map50_95"] <= summary["map50"]
    assert summary["best"] == str(out / "train" / "weights" / "best.pt")
    assert set(summary["seconds"]) == {"dataset", "train", "test", "predict", "total"}
    cores = available_cores()  # the subprocess inherits this process's affinity
    assert summary["threads"] == cores  # workers=0 on the CPU: every core trains

    printed = run.stdout + run.stderr
    assert re.search(
        rf"revcol demo finished in \d+m\d\ds \(trained with {cores} torch threads?, {cores} CPU cores?", printed
    )
    assert f"test mAP50 {summary['map50']:.3f}" in printed
    for path in ("dataset/data.yaml", "train/weights/best.pt", "predictions.jpg", "summary.json"):
        assert path in printed, path
    assert "Traceback" not in printed
