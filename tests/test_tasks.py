"""Segment, pose, OBB and classify on a RevCol backbone, end to end on CPU and offline.

Each task trains a tiny model once on a generated dataset (``task_data``), then: val, predict, ``best.pt``
in a fresh process that never imported ``revcol``, ONNX parity, and the trainer's weight-decay groups.
The shipped ``yolo-revcol-*.yaml`` configs are too slow to train here; each is built once by bare name.
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
from revcol_helpers import TINY_NECK, revcol_env, tiny_yaml
from ultralytics import YOLO
from ultralytics.nn.modules import OBB, Classify, Pose, Segment

from revcol.integration import RevColBackbone
from revcol.trainers import no_decay_parameters

IMGSZ = 64


def task_yaml(head: str, neck: str = TINY_NECK, extra: str = "") -> str:
    """Like the shipped configs, with 80 classes (and 17 keypoints): training takes the dataset's numbers."""
    return tiny_yaml(head, neck=neck, nc=80, extra=extra)


@dataclass(frozen=True)
class Task:
    name: str  # Ultralytics' task name
    config: str  # the shipped config
    head: type
    tiny_yaml: str
    dataset: Callable[..., Path]  # task_data generator: returns what data= takes
    metric: str  # the results_dict key val must report
    from_data: dict  # what the trained model's YAML must hold, taken from the dataset


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
}  # fmt: skip
RESULT_FIELDS = ("boxes", "masks", "keypoints", "obb", "probs")  # what a Results may carry, by task


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
    model = YOLO(str(root / "model.yaml"))
    model.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
        project=str(root / "runs"), name="train", exist_ok=True, verbose=False,
        nbs=4,  # nominal batch = batch: an optimizer step every iteration (default 64 would accumulate 16)
    )  # fmt: skip
    image = next((root / "data").glob("**/val/**/*.png"))
    return Run(task, model, data, image, root)


def prediction_arrays(model: YOLO, image: Path) -> dict[str, np.ndarray]:
    result = model.predict(str(image), imgsz=IMGSZ, conf=0.0, max_det=20, verbose=False)[0]
    return {f: getattr(result, f).data.numpy() for f in RESULT_FIELDS if getattr(result, f) is not None}


FRESH_PREDICT = f"""
import json, sys
import numpy as np
assert "revcol" not in sys.modules
from ultralytics import YOLO
model = YOLO(sys.argv[1])
imported_by_load = "revcol" in sys.modules
result = model.predict(sys.argv[2], imgsz={IMGSZ}, conf=0.0, max_det=20, verbose=False)[0]
fields = {RESULT_FIELDS!r}
np.savez(sys.argv[3], **{{f: getattr(result, f).data.numpy() for f in fields if getattr(result, f) is not None}})
print(json.dumps({{"revcol_imported_by_load": imported_by_load, "task": model.task}}))
"""


@pytest.mark.parametrize("task", TASKS.values(), ids=list(TASKS))
def test_shipped_config_builds_by_bare_name(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here: the shim serves the packaged one
    model = YOLO(task.config)
    assert model.task == task.name
    layers = model.model.model
    assert isinstance(layers[0], RevColBackbone) and layers[0].variant == "revcol_tiny"
    assert type(layers[-1]) is task.head


def test_train_writes_best_with_revcol_backbone(run):
    assert run.best.is_file() and run.best.name == "best.pt"
    assert run.model.task == run.task.name
    trained = YOLO(str(run.best)).model
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
    expected = prediction_arrays(YOLO(str(run.best)), run.image)
    assert expected and all(a.size for a in expected.values()), f"predict returned nothing: {expected}"

    arrays = tmp_path / "fresh.npz"
    env = revcol_env(tmp_path)
    command = [sys.executable, "-c", FRESH_PREDICT, str(run.best), str(run.image), str(arrays)]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"revcol_imported_by_load": True, "task": run.task.name}  # unpickling imported revcol
    assert not Path(env["REVCOL_NETWORK_LOG"]).exists()

    fresh = dict(np.load(arrays))
    assert fresh.keys() == expected.keys()
    for field, value in expected.items():
        assert fresh[field].shape == value.shape, field
        if field == "masks":  # thresholded: a logit within float noise of 0 may flip a pixel
            assert np.mean(fresh[field] != value) <= 1e-3
        else:
            np.testing.assert_allclose(fresh[field], value, atol=1e-4, err_msg=field)


def _eval_outputs(output) -> list[torch.Tensor]:
    """The tensors an export returns, from an eval-mode forward: ``(y, raw)`` or ``((y, proto), raw)``."""
    head = output[0] if isinstance(output, (list, tuple)) else output
    return list(head) if isinstance(head, (list, tuple)) else [head]


def test_onnx_export_matches_pytorch(run):
    import onnxruntime

    path = YOLO(str(run.best)).export(format="onnx", imgsz=IMGSZ, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    onnx_outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch_outputs = _eval_outputs(YOLO(str(run.best)).model.eval()(x))
    assert len(onnx_outputs) == len(torch_outputs)
    for actual, expected in zip(onnx_outputs, torch_outputs, strict=True):
        assert actual.shape == tuple(expected.shape)
        assert np.abs(actual - expected.numpy()).max() <= 1e-4
