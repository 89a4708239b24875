"""The offline demo (``revcol.demo``): its synthetic shapes dataset, its pieces and a shortened ``revcol demo`` run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers.plugin import tiny_rtdetr
from helpers.processes import revcol_env

from revcol.demo.pictures import PICTURE_SIZE, annotate
from revcol.demo.run import DEMO_DEFAULTS, denoising_queries, offline, thread_meter, training_threads
from revcol.demo.shapes import CLASSES, MAX_SHAPES, generate_dataset, make_image
from revcol.demo.threads import (
    MIN_INTERVAL,
    IdleCores,
    available_cores,
    metered_threads,
    parse_proc_stat,
    threads_for,
)

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


def shape_statistics(images: int, imgsz: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Per shape of ``images`` generated images: its class, and its colour's hue, saturation and value and its box's
    width in pixels."""
    rng = np.random.default_rng(11)
    classes, features = [], []
    for _ in range(images):
        image, labels = make_image(rng, imgsz)
        for c, x0, y0, x1, y1 in pixel_boxes(np.array(labels).reshape(-1, 5), imgsz):
            colour = image[(y0 + y1) // 2, (x0 + x1) // 2]  # the centre of every shape is painted
            hue, saturation, value = cv2.cvtColor(colour.reshape(1, 1, 3), cv2.COLOR_BGR2HSV)[0, 0]
            classes.append(c)
            features.append((hue, saturation, value, x1 - x0))
    return np.array(classes), np.array(features, dtype=float)


def test_colours_and_sizes_do_not_tell_the_classes_apart():
    """The classes differ by shape alone: per class, the colours' hue, saturation and value and the boxes' widths
    come from one distribution (a chi-square test of homogeneity over quantile bins does not reject it at 0.1 %),
    and each class's mean stays within a small margin of the others'."""
    from scipy.stats import chi2_contingency

    classes, features = shape_statistics(1500)
    assert np.bincount(classes).min() > 700
    for name, values, margin in zip(("hue", "saturation", "value", "width"), features.T, (6, 4, 2, 1), strict=True):
        edges = np.quantile(values, np.linspace(0, 1, 7)[1:-1])
        counts = np.array([np.bincount(np.digitize(values[classes == c], edges), minlength=6) for c in range(3)])
        assert chi2_contingency(counts).pvalue > 0.001, (name, counts)
        means = [values[classes == c].mean() for c in range(3)]
        assert max(means) - min(means) < margin, (name, means)


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


def test_thread_meter_only_on_the_cpu_without_loader_workers():
    assert isinstance(thread_meter("cpu", workers=0), IdleCores)
    assert isinstance(thread_meter("CPU", workers=0), IdleCores)
    assert thread_meter("cpu", workers=2) is None  # Ultralytics leaves a core to its loader workers
    assert thread_meter("0", workers=0) is None  # a GPU: Ultralytics' setting
    assert 1 <= training_threads("cpu", workers=0) <= available_cores()
    assert training_threads("cpu", workers=2) is None and training_threads("0", workers=0) is None


@pytest.mark.parametrize(
    ("free", "cores", "threads"),
    [(0.0, 2, 1), (0.74, 2, 1), (1.0, 2, 1), (1.74, 2, 1), (1.75, 2, 2), (2.0, 2, 2), (3.5, 2, 2), (3.8, 8, 4)],
)
def test_threads_are_the_free_cores_rounded_down_unless_three_quarters_free(free, cores, threads):
    assert threads_for(free, cores) == threads


def proc_stat(*cpus: tuple[int, int]) -> str:
    """/proc/stat text with one line per CPU of (busy, idle) ticks: busy split over user and system, idle over idle
    and iowait, plus the aggregate line and lines that are not CPUs."""
    lines = [f"cpu  {sum(b for b, _ in cpus)} 0 0 {sum(i for _, i in cpus)} 0 0 0 0 0 0"]
    for n, (busy, idle) in enumerate(cpus):
        lines.append(f"cpu{n} {busy - busy // 2} 0 {busy // 2} {idle - idle // 4} {idle // 4} 0 0 0 5 0")
    return "\n".join([*lines, "intr 12345 0 0", "ctxt 999", "btime 1700000000", "procs_running 3"]) + "\n"


def test_parse_proc_stat_counts_iowait_as_idle_and_guest_not_twice():
    ticks = parse_proc_stat(proc_stat((300, 700), (1000, 0)))
    assert ticks == {0: (700, 1000), 1: (0, 1000)}


class FakeMachine:
    """/proc/stat, this process's CPU time and a clock, advanced by hand: ``tick`` runs one second."""

    def __init__(self, cpus: int) -> None:
        self.busy, self.idle = [0] * cpus, [0] * cpus
        self.now, self.own = 100.0, 0.0

    def tick(self, idle_shares: list[float], own_cores: float) -> None:
        for n, share in enumerate(idle_shares):
            self.idle[n] += round(100 * share)
            self.busy[n] += 100 - round(100 * share)
        self.now += 1.0
        self.own += own_cores

    def stat(self) -> str:
        return proc_stat(*zip(self.busy, self.idle, strict=True))

    def meter(self, cpus: set[int]) -> IdleCores:
        return IdleCores(cpus, read_stat=self.stat, own_time=lambda: self.own, clock=lambda: self.now)


@pytest.mark.parametrize(
    ("idle_shares", "own_cores", "threads"),
    [
        ([1.0, 1.0], 0.0, 2),  # a quiet machine, the demo making its dataset on neither core yet
        ([0.05, 0.95], 1.0, 2),  # quiet: the demo's one busy core is its own
        ([0.0, 0.0], 0.67, 1),  # two CPU-bound processes beside the demo: they take 1.33 cores
        ([0.1, 0.4], 0.3, 1),  # others take 1.2 cores: 0.8 free is not enough for a second thread
        ([0.0, 0.0], 2.0, 2),  # the demo's own two threads fill both cores
    ],
)
def test_idle_cores_count_the_cores_other_processes_leave(idle_shares, own_cores, threads):
    machine = FakeMachine(2)
    meter = machine.meter({0, 1})
    machine.tick(idle_shares, own_cores)
    assert meter.free() == pytest.approx(min(2.0, sum(idle_shares) + own_cores))
    machine.tick(idle_shares, own_cores)
    assert meter.threads() == threads


def test_idle_cores_read_only_the_allowed_cpus_and_follow_the_load():
    machine = FakeMachine(4)
    meter = machine.meter({1, 2})  # as under taskset -c 1,2
    assert meter.cores == 2
    machine.tick([0.0, 1.0, 0.9, 0.0], 0.0)  # CPUs 0 and 3 are busy, but not ours
    assert meter.threads() == 2
    machine.tick([1.0, 0.0, 0.2, 1.0], 0.5)  # others took 1.3 of our cores
    assert meter.threads() == 1
    machine.tick([1.0, 0.5, 0.5, 1.0], 1.0)  # the load has gone: the demo's one thread is the only user
    assert meter.threads() == 2


def test_idle_cores_wait_for_a_reading_long_enough(monkeypatch):
    machine = FakeMachine(1)
    meter = machine.meter({0})
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    machine.now += 0.2
    meter.free()
    assert slept == [pytest.approx(MIN_INTERVAL - 0.2)]


def test_without_proc_stat_the_load_average_counts_once_then_the_count_holds():
    def no_stat() -> str:
        raise FileNotFoundError("/proc/stat")

    meter = IdleCores({0, 1, 2, 3}, read_stat=no_stat, load_average=lambda: (1.2, 0.0, 0.0))
    assert meter.free() is None
    assert meter.threads() == 3  # 2.8 cores free
    assert meter.threads() == 3  # the load average would count the demo's own threads now
    assert IdleCores({0, 1, 2}, read_stat=no_stat, load_average=None).threads() == 3  # no reading at all: every core


def test_metered_threads_set_the_count_at_the_event_and_give_it_back():
    class Meter:
        def threads(self) -> int:
            return 1

    class Model:
        def __init__(self) -> None:
            self.callbacks = {}

        def add_callback(self, event: str, callback) -> None:
            self.callbacks[event] = callback

    model, used, before = Model(), [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with metered_threads(Meter(), model, "on_val_start", used):
            torch.set_num_threads(3)  # Ultralytics' select_device, before the event
            model.callbacks["on_val_start"](object())
            assert torch.get_num_threads() == 1 and used == [1]
        assert torch.get_num_threads() == 2
        with metered_threads(None, model, "on_train_epoch_start", used):  # no meter: Ultralytics' count stays
            torch.set_num_threads(3)
            model.callbacks["on_train_epoch_start"](object())
            assert torch.get_num_threads() == 3 and used == [1, 3]
    finally:
        torch.set_num_threads(before)


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
    # workers=0 on the CPU: one count per epoch, from the cores other processes leave free (at least one thread)
    assert len(summary["threads"]) == 1 and 1 <= summary["threads"][0] <= cores

    printed = run.stdout + run.stderr
    threads = summary["threads"][0]
    assert re.search(
        rf"revcol demo finished in \d+m\d\ds \(trained with {threads} torch threads?, {cores} CPU cores? available",
        printed,
    )
    assert f"test mAP50 {summary['map50']:.3f}" in printed
    for path in ("dataset/data.yaml", "train/weights/best.pt", "predictions.jpg", "summary.json"):
        assert path in printed, path
    assert "Traceback" not in printed


def test_the_default_demo_labels_the_test_shapes_right(tmp_path):
    """The README's ``revcol demo`` with every default, as a user runs it, reaches the test mAP50 the README promises
    (0.85: its pictures then label the shapes right); whatever the threads the free cores allow."""
    run = subprocess.run(
        [str(REVCOL), "demo", "--output", str(tmp_path / "demo")],
        cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["map50"] >= 0.85, summary
    assert len(summary["threads"]) == DEMO_DEFAULTS["epochs"]
