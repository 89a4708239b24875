"""Segment, pose, OBB, classify, semantic, depth and the P2 detectors on a RevCol backbone, end to end on CPU, offline.

Each task trains a tiny model once on a generated dataset (``task_data``), then: val, predict, ``best.pt``
in a fresh process that never imported ``revcol``, ONNX parity, and the trainer's weight-decay groups.
The shipped configs are too slow to train here; each is built once by bare name and run forward once.
Depth exists from Ultralytics 8.4.104: below that, the shipped config must fail with an error naming the version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import task_data
import torch
import ultralytics
from revcol_helpers import TINY_BACKBONE, TINY_NECK, revcol_env, tiny_yaml
from ultralytics import RTDETR, YOLO
from ultralytics.nn import modules
from ultralytics.nn.modules import OBB, Classify, Detect, Pose, RTDETRDecoder, Segment
from ultralytics.utils.checks import check_version

from revcol import ConfigError
from revcol.demo import generate_dataset
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.trainers import no_decay_parameters

IMGSZ = 64
HAS_DEPTH = check_version(ultralytics.__version__, ">=8.4.104")
SemanticSegment = modules.SemanticSegment  # from 8.4.52, older than the supported floor
Depth = getattr(modules, "Depth", None)


def task_yaml(head: str, neck: str = TINY_NECK, extra: str = "") -> str:
    """Like the shipped configs, with 80 classes (and 17 keypoints): training takes the dataset's numbers."""
    return tiny_yaml(head, neck=neck, nc=80, extra=extra)


# The P2 detectors: the neck goes on down to RevCol's stride-4 map (layer 1) and the head reads it.
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
        task_yaml("[[10, 7, 4], 1, Segment, [nc, 8, 16]]"),
        task_data.segment_dataset, "metrics/mAP50(M)", {"nc": 2},
    ),
    "pose": Task(
        "pose", "yolo-revcol-pose.yaml", Pose,
        task_yaml("[[10, 7, 4], 1, Pose, [nc, kpt_shape]]", extra="kpt_shape: [17, 3]\n"),
        task_data.pose_dataset, "metrics/mAP50(P)", {"nc": 1, "kpt_shape": [3, 3]},
    ),
    "obb": Task(
        "obb", "yolo-revcol-obb.yaml", OBB,
        task_yaml("[[10, 7, 4], 1, OBB, [nc, 1]]"),
        task_data.obb_dataset, "metrics/mAP50(B)", {"nc": 2},
    ),
    "classify": Task(
        "classify", "yolo-revcol-cls.yaml", Classify,
        task_yaml("[-1, 1, Classify, [nc]]", neck=""),
        task_data.classify_dataset, "metrics/accuracy_top1", {"nc": 2},
    ),
    "semantic": Task(
        "semantic", "yolo-revcol-sem.yaml", SemanticSegment,
        task_yaml("[[10, 7], 1, SemanticSegment, [nc]]"),
        task_data.semantic_dataset, "metrics/mIoU", {"nc": 3},
    ),
    **({"depth": Task(
        "depth", "yolo-revcol-depth.yaml", Depth,
        task_yaml("[[10, 7, 4], 1, Depth, [16]]"),
        task_data.depth_dataset, "metrics/delta1", {},
    )} if HAS_DEPTH else {}),
    "yolo-p2": Task(
        "detect", "yolo-revcol-p2.yaml", Detect,
        task_yaml("[[13, 10, 7], 1, Detect, [nc]]", neck=TINY_P2_NECK),
        detect_dataset, "metrics/mAP50(B)", {"nc": 3}, reads=(14, 17, 20, 23),
    ),
    "rtdetr-p2": Task(
        "detect", "rtdetr-revcol-p2.yaml", RTDETRDecoder, TINY_RTDETR_P2,
        detect_dataset, "metrics/mAP50(B)", {"nc": 3}, loader=RTDETR, reads=(21, 24, 27, 30),
    ),
}  # fmt: skip
# what a Results may carry, by task (depth only from 8.4.104)
RESULT_FIELDS = ("boxes", "masks", "keypoints", "obb", "probs", "semantic_mask", "depth")
THRESHOLDED = ("masks", "semantic_mask")  # per-pixel decisions: a logit within float noise of a tie may flip


@dataclass
class Run:
    task: Task
    model: YOLO  # the model that trained: its .trainer is still there
    data: Path
    image: Path  # a val image to predict on
    root: Path

    @property
    def best(self) -> Path:
        return Path(self.model.trainer.best)


@pytest.fixture(scope="module", params=list(TASKS))
def run(request, tmp_path_factory) -> Run:
    task = TASKS[request.param]
    root = tmp_path_factory.mktemp(task.name)
    data = task.dataset(root / "data", n_train=8, n_val=4, imgsz=IMGSZ)
    (root / "model.yaml").write_text(task.tiny_yaml)
    model = task.loader(str(root / "model.yaml"))
    model.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
        project=str(root / "runs"), name="train", exist_ok=True, verbose=False,
        nbs=4,  # nominal batch = batch: an optimizer step every iteration (default 64 would accumulate 16)
    )  # fmt: skip
    image = next((root / "data").glob("**/val/**/*.png"))
    return Run(task, model, data, image, root)


def prediction_arrays(model: YOLO, image: Path) -> dict[str, np.ndarray]:
    result = model.predict(str(image), imgsz=IMGSZ, conf=0.0, max_det=20, verbose=False)[0]
    return {f: getattr(result, f).data.numpy() for f in RESULT_FIELDS if getattr(result, f, None) is not None}


FRESH_PREDICT = f"""
import json, sys
import numpy as np
assert "revcol" not in sys.modules
import ultralytics
model = getattr(ultralytics, sys.argv[4])(sys.argv[1])
imported_by_load = "revcol" in sys.modules
result = model.predict(sys.argv[2], imgsz={IMGSZ}, conf=0.0, max_det=20, verbose=False)[0]
fields = {RESULT_FIELDS!r}
arrays = {{f: getattr(result, f).data.numpy() for f in fields if getattr(result, f, None) is not None}}
np.savez(sys.argv[3], **arrays)
print(json.dumps({{"revcol_imported_by_load": imported_by_load, "task": model.task}}))
"""


@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
def test_shipped_config_builds_by_bare_name(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the shim serves the packaged one
    model = task.loader(task.config)
    assert model.task == task.name
    layers = model.model.model
    assert isinstance(layers[0], RevColBackbone) and layers[0].variant == "revcol_tiny"
    assert type(layers[-1]) is task.head
    if task.reads:  # the head reads the P2 level, which the neck built from layer 1 (the stride-4 map)
        assert tuple(layers[-1].f) == task.reads
        assert any(1 in (m.f if isinstance(m.f, list) else [m.f]) for m in layers[5 : task.reads[0] + 1])
    with torch.no_grad():
        model.model.eval()(torch.zeros(1, 3, 128, 128))


def test_p2_heads_see_the_stride_4_map():
    assert YOLO("yolo-revcol-p2.yaml").model.stride.tolist() == [4.0, 8.0, 16.0, 32.0]
    decoder = RTDETR("rtdetr-revcol-p2.yaml").model.model[-1]
    assert decoder.nl == 4 and [p[0].in_channels for p in decoder.input_proj] == [256] * 4


def test_depth_config_needs_ultralytics_8_4_104(tmp_path, monkeypatch):
    """Built from 8.4.104; on an older release (the floor) an error that names the version it needs."""
    monkeypatch.chdir(tmp_path)
    if HAS_DEPTH:
        model = YOLO("yolo-revcol-depth.yaml")
        assert model.task == "depth" and type(model.model.model[-1]) is Depth
        return
    with pytest.raises(ConfigError, match=r"'Depth' needs ultralytics>=8\.4\.104; this is ultralytics 8\.4\.\d+"):
        YOLO("yolo-revcol-depth.yaml")


def test_train_writes_best_with_revcol_backbone(run):
    assert run.best.is_file() and run.best.name == "best.pt"
    assert run.model.task == run.task.name
    trained = run.task.loader(str(run.best)).model
    assert {k: trained.yaml[k] for k in run.task.from_data} == run.task.from_data
    assert isinstance(run.model.model.model[0], RevColBackbone)
    assert type(run.model.model.model[-1]) is run.task.head


def test_trainer_excludes_alphas_and_gammas_from_weight_decay(run):
    trainer = run.model.trainer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    special = no_decay_parameters(trainer.model)
    assert special and max(decay.values()) > 0
    decayed = [names[id(p)] for p in special if decay[id(p)] != 0.0]
    assert decayed == [], f"{type(trainer).__name__} decays {len(decayed)} RevCol alphas/gammas, e.g. {decayed[:3]}"


def test_val_reports_task_metrics(run):
    metrics = run.model.val(
        data=str(run.data), imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, verbose=False,
        project=str(run.root / "runs"), name="val", exist_ok=True,
    )  # fmt: skip
    assert 0.0 <= metrics.results_dict[run.task.metric] <= 1.0


def test_best_pt_predicts_the_same_in_a_fresh_process(run, tmp_path):
    expected = prediction_arrays(run.task.loader(str(run.best)), run.image)
    assert expected and all(a.size for a in expected.values()), f"predict returned nothing: {expected}"

    arrays = tmp_path / "fresh.npz"
    env = revcol_env(tmp_path)
    command = [
        sys.executable,
        "-c",
        FRESH_PREDICT,
        str(run.best),
        str(run.image),
        str(arrays),
        run.task.loader.__name__,
    ]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"revcol_imported_by_load": True, "task": run.task.name}  # unpickling imported revcol
    assert not Path(env["REVCOL_NETWORK_LOG"]).exists()

    fresh = dict(np.load(arrays))
    assert fresh.keys() == expected.keys()
    for field, value in expected.items():
        assert fresh[field].shape == value.shape, field
        if field in THRESHOLDED:
            assert np.mean(fresh[field] != value) <= 1e-3
        else:
            np.testing.assert_allclose(fresh[field], value, atol=1e-4, err_msg=field)


def _eval_outputs(output) -> list[torch.Tensor]:
    """The tensors an export returns, from an eval-mode forward: ``(y, raw)`` or ``((y, proto), raw)``."""
    head = output[0] if isinstance(output, (list, tuple)) else output
    return list(head) if isinstance(head, (list, tuple)) else [head]


def test_onnx_export_matches_pytorch(run):
    import onnxruntime

    path = run.task.loader(str(run.best)).export(format="onnx", imgsz=IMGSZ, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    onnx_outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = run.task.loader(str(run.best)).model.eval()
    if run.task.name in {"semantic", "depth"}:  # their ONNX graphs end upsampled (and semantic's in the class map)
        model.model[-1].export, model.model[-1].format = True, "onnx"
    with torch.no_grad():
        torch_outputs = _eval_outputs(model(x))
    assert len(onnx_outputs) == len(torch_outputs)
    for actual, expected in zip(onnx_outputs, torch_outputs, strict=True):
        assert actual.shape == tuple(expected.shape)
        if np.issubdtype(expected.numpy().dtype, np.integer):  # semantic's class map (8.4.67 exports the logits)
            assert actual.dtype == expected.numpy().dtype and np.mean(actual != expected.numpy()) <= 1e-3
        else:
            assert np.abs(actual - expected.numpy()).max() <= 1e-4
