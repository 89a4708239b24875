"""Tiny models of every Ultralytics task on a RevCol backbone, and training one of them for an epoch.

``TASKS``: per task, the shipped config, its head, a tiny YAML of the same layout, its dataset (``task_data``) and
what val reports; ``DETECTORS``: RT-DETR and YOLO of ``yamls``. ``train`` trains one by name on its generated
dataset, on the CPU, offline. The ``trained`` fixture (``conftest``) calls it once per name and test process:
``test_tasks``, ``test_e2e`` and ``test_export`` share what it trained. ``predict_in_fresh_processes`` runs trained
models' ``best.pt`` in processes that never imported revcol.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ultralytics import RTDETR, YOLO
from ultralytics.nn import modules
from ultralytics.nn.modules import OBB, Classify, Detect, Pose, RTDETRDecoder, Segment

from helpers import task_data
from helpers.plugin import HAS_DEPTH
from helpers.yamls import IMGSZ, TINY_BACKBONE, TINY_NECK, TINY_RTDETR_YAML, TINY_YOLO_YAML, tiny_yaml
from revcol.demo import generate_dataset

SemanticSegment = modules.SemanticSegment  # from 8.4.52, older than the supported floor
Depth = getattr(modules, "Depth", None)


def like_shipped(head: str, neck: str = TINY_NECK, extra: str = "") -> str:
    """A tiny model YAML with 80 classes (and 17 keypoints), like the shipped configs: training takes the dataset's
    numbers."""
    return tiny_yaml(head, neck=neck, nc=80, extra=extra)


TINY_P2_NECK = (
    TINY_NECK
    + """\
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 11
  - [[-1, 1], 1, Concat, [1]]  # 12 cat P2 (stride 4)
  - [-1, 1, C2f, [8]]  # 13 P2
"""
)


TINY_RTDETR_P2 = f"""\
nc: 80
backbone:
  - {TINY_BACKBONE}  # 0-4
head:
  - [-1, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 5
  - [-1, 1, AIFI, [64, 2]]  # 6
  - [-1, 1, Conv, [32, 1, 1]]  # 7 Y5
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 8
  - [3, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 9
  - [[-2, -1], 1, Concat, [1]]  # 10
  - [-1, 1, RepC3, [32, 0.5]]  # 11
  - [-1, 1, Conv, [32, 1, 1]]  # 12 Y4
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 13
  - [2, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 14
  - [[-2, -1], 1, Concat, [1]]  # 15
  - [-1, 1, RepC3, [32, 0.5]]  # 16
  - [-1, 1, Conv, [32, 1, 1]]  # 17 Y3
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 18
  - [1, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 19 stride 4
  - [[-2, -1], 1, Concat, [1]]  # 20
  - [-1, 1, RepC3, [32, 0.5]]  # 21 P2
  - [-1, 1, Conv, [32, 3, 2]]  # 22
  - [[-1, 17], 1, Concat, [1]]  # 23
  - [-1, 1, RepC3, [32, 0.5]]  # 24 P3
  - [-1, 1, Conv, [32, 3, 2]]  # 25
  - [[-1, 12], 1, Concat, [1]]  # 26
  - [-1, 1, RepC3, [32, 0.5]]  # 27 P4
  - [-1, 1, Conv, [32, 3, 2]]  # 28
  - [[-1, 7], 1, Concat, [1]]  # 29
  - [-1, 1, RepC3, [32, 0.5]]  # 30 P5
  - [[21, 24, 27, 30], 1, RTDETRDecoder, [nc, 32, 10, 2, 2, 1, 64]]  # 31
"""


def detect_dataset(root: Path, n_train: int, n_val: int, imgsz: int) -> Path:
    return generate_dataset(root, n_train=n_train, n_val=n_val, n_test=1, imgsz=imgsz, seed=0)


@dataclass(frozen=True)
class Task:
    name: str  # Ultralytics' task name
    config: str  # the shipped config
    head: type
    tiny_yaml: str
    dataset: Callable[..., Path]  # task_data generator: returns what data= takes
    metric: str  # the results_dict key val must report
    from_data: dict  # what the trained model's YAML must hold, taken from the dataset
    loader: type = YOLO  # the Ultralytics model class that loads it
    reads: tuple[int, ...] | None = None  # the layers the head must read (the P2 configs: stride 4 first)


TASKS = {
    "segment": Task(
        "segment", "yolo-revcol-seg.yaml", Segment,
        like_shipped("[[10, 7, 4], 1, Segment, [nc, 8, 16]]"),
        task_data.segment_dataset, "metrics/mAP50(M)", {"nc": 2},
    ),
    "pose": Task(
        "pose", "yolo-revcol-pose.yaml", Pose,
        like_shipped("[[10, 7, 4], 1, Pose, [nc, kpt_shape]]", extra="kpt_shape: [17, 3]\n"),
        task_data.pose_dataset, "metrics/mAP50(P)", {"nc": 1, "kpt_shape": [3, 3]},
    ),
    "obb": Task(
        "obb", "yolo-revcol-obb.yaml", OBB,
        like_shipped("[[10, 7, 4], 1, OBB, [nc, 1]]"),
        task_data.obb_dataset, "metrics/mAP50(B)", {"nc": 2},
    ),
    "classify": Task(
        "classify", "yolo-revcol-cls.yaml", Classify,
        like_shipped("[-1, 1, Classify, [nc]]", neck=""),
        task_data.classify_dataset, "metrics/accuracy_top1", {"nc": 2},
    ),
    "semantic": Task(
        "semantic", "yolo-revcol-sem.yaml", SemanticSegment,
        like_shipped("[[10, 7], 1, SemanticSegment, [nc]]"),
        task_data.semantic_dataset, "metrics/mIoU", {"nc": 3},
    ),
    **({"depth": Task(
        "depth", "yolo-revcol-depth.yaml", Depth,
        like_shipped("[[10, 7, 4], 1, Depth, [16]]"),
        task_data.depth_dataset, "metrics/delta1", {},
    )} if HAS_DEPTH else {}),
    "yolo-p2": Task(
        "detect", "yolo-revcol-p2.yaml", Detect,
        like_shipped("[[13, 10, 7], 1, Detect, [nc]]", neck=TINY_P2_NECK),
        detect_dataset, "metrics/mAP50(B)", {"nc": 3}, reads=(14, 17, 20, 23),
    ),
    "rtdetr-p2": Task(
        "detect", "rtdetr-revcol-p2.yaml", RTDETRDecoder, TINY_RTDETR_P2,
        detect_dataset, "metrics/mAP50(B)", {"nc": 3}, loader=RTDETR, reads=(21, 24, 27, 30),
    ),
}  # fmt: skip


DETECTORS = {"rtdetr": (RTDETR, TINY_RTDETR_YAML), "yolo": (YOLO, TINY_YOLO_YAML)}

# Backbone weights of each run when training starts and ends, by run name and event (a module-level function keeps
# the callbacks picklable, as Ultralytics' DDP launcher pickles the trainer with them). In memory, in float32:
# best.pt holds float16 weights, which would hide the small first steps of a short run.
BACKBONE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def _snapshot_backbone(name: str, event: str, trainer) -> None:
    BACKBONE[name, event] = {k: v.detach().clone() for k, v in trainer.model.model[0].state_dict().items()}


@dataclass
class Run:
    """A model trained by ``train``, with what it trained on."""

    name: str  # a key of TASKS or DETECTORS
    model: YOLO  # the model that trained: its .trainer is still there
    data: Path  # what data= took
    image: Path  # a val image to predict on
    root: Path
    task: Task | None  # None for the DETECTORS

    @property
    def best(self) -> Path:
        return Path(self.model.trainer.best)

    def backbone(self, event: str) -> dict[str, torch.Tensor]:
        """The backbone's weights at ``on_train_start`` or ``on_train_end``."""
        return BACKBONE[self.name, event]


def train(name: str, root: Path) -> Run:
    """One epoch of ``name`` (a key of TASKS or DETECTORS) on 8 generated 64 px images, everything under ``root``."""
    task = TASKS.get(name)
    if task is None:
        loader, model_yaml = DETECTORS[name]
        data = generate_dataset(root / "data", n_train=8, n_val=4, imgsz=IMGSZ, seed=0)
    else:
        loader, model_yaml = task.loader, task.tiny_yaml
        data = task.dataset(root / "data", n_train=8, n_val=4, imgsz=IMGSZ)
    (root / "model.yaml").write_text(model_yaml)
    model = loader(str(root / "model.yaml"))
    for event in ("on_train_start", "on_train_end"):
        model.add_callback(event, functools.partial(_snapshot_backbone, name, event))
    model.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
        project=str(root / "runs"), name="train", exist_ok=True, verbose=False,
        nbs=4,  # nominal batch = batch: an optimizer step every iteration (default 64 would accumulate 16)
    )  # fmt: skip
    image = next((root / "data").glob("**/val/**/*.png"))
    return Run(name, model, data, image, root, task)


# --------------------------------------------------------------------------- trained models in fresh processes

# What a Results may carry, by task (depth only from 8.4.104).
RESULT_FIELDS = ("boxes", "masks", "keypoints", "obb", "probs", "semantic_mask", "depth")

# argv: the requests (JSON), predict's keyword arguments (JSON). A fresh interpreter imports Ultralytics, then
# forks one child per request: each child starts as a process that never imported revcol, the state a user's
# script is in, and the imports are paid once. A child writes <out>.log (its output), and on success <out>.npz
# (the result's arrays) and <out>.json. With ULTRALYTICS_SAFE_LOAD a load before ``import revcol`` must fail first.
FRESH = f"""
import json, os, sys, traceback
import numpy as np
import ultralytics

def predict(request, options):
    log = os.open(request["out"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    assert "revcol" not in sys.modules
    refused = None
    if os.environ.get("ULTRALYTICS_SAFE_LOAD"):
        try:
            ultralytics.RTDETR(request["weights"])
        except Exception as error:
            refused = type(error).__name__
        import revcol
    model = getattr(ultralytics, request["loader"])(request["weights"])
    imported_by_load = "revcol" in sys.modules
    result = model.predict(request["image"], verbose=False, **options)[0]
    fields = {RESULT_FIELDS!r}
    np.savez(request["out"] + ".npz", **{{f: getattr(result, f).data.numpy() for f in fields
                                          if getattr(result, f, None) is not None}})
    report = {{"revcol_imported_by_load": imported_by_load, "task": model.task, "refused": refused}}
    with open(request["out"] + ".json", "w") as file:
        json.dump(report, file)

requests, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for request in requests:
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            predict(request, options)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.waitpid(child, 0)
"""


@dataclass
class FreshPrediction:
    """What predicting with a ``best.pt`` in a fresh process gave: its report and the result's arrays."""

    log: str  # the child's output
    report: dict | None  # revcol_imported_by_load, task, refused (the safe load's error); None if it failed
    arrays: dict[str, np.ndarray]


def predict_in_fresh_processes(
    runs: list[Run], folder: Path, env: dict[str, str], **options
) -> dict[str, FreshPrediction]:
    """Each run's ``best.pt`` loaded (by its Ultralytics class) in a process of its own that never imported revcol,
    and run on its image with ``options`` (``FRESH``); a ``FreshPrediction`` by run name."""
    folder.mkdir(parents=True, exist_ok=True)
    requests = [
        {"weights": str(run.best), "image": str(run.image), "loader": type(run.model).__name__,
         "out": str(folder / run.name)}
        for run in runs
    ]  # fmt: skip
    options = {"imgsz": IMGSZ, "conf": 0.0, **options}
    command = [sys.executable, "-c", FRESH, json.dumps(requests), json.dumps(options)]
    out = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = {}
    for run in runs:
        stem = folder / run.name
        report = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else None
        arrays = dict(np.load(stem.with_suffix(".npz"))) if report is not None else {}
        predictions[run.name] = FreshPrediction(stem.with_suffix(".log").read_text(), report, arrays)
    return predictions
