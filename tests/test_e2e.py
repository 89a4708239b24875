"""End to end with Ultralytics on CPU, offline: train, val, predict, reload, safe load, ONNX, DDP file."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from revcol_helpers import TINY_RTDETR_YAML, TINY_YOLO_YAML
from ultralytics import RTDETR, YOLO

from revcol.demo import generate_dataset
from revcol.integration import RevColBackbone
from revcol.trainers import RevColDetectionTrainer, RevColRTDETRTrainer, no_decay_parameters

IMGSZ = 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    (root / "rtdetr-tiny-revcol.yaml").write_text(TINY_RTDETR_YAML)
    (root / "yolo-tiny-revcol.yaml").write_text(TINY_YOLO_YAML)
    return root, generate_dataset(root / "data", n_train=8, n_val=4, imgsz=IMGSZ, seed=0)


# Backbone weights each trainer started from, by run name (a module-level function keeps the callback picklable,
# as Ultralytics' DDP launcher pickles the trainer with its callbacks).
BACKBONE_BEFORE: dict[str, dict[str, torch.Tensor]] = {}


def _snapshot_backbone(name, trainer):
    BACKBONE_BEFORE[name] = {k: v.detach().clone() for k, v in trainer.model.model[0].state_dict().items()}


def _train(model, workspace, name):
    root, data = workspace
    model.add_callback("on_train_start", functools.partial(_snapshot_backbone, name))
    model.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
        project=str(root / "runs"), name=name, exist_ok=True, amp=False, verbose=False,
    )  # fmt: skip
    return model


@pytest.fixture(scope="module")
def rtdetr(workspace):
    return _train(RTDETR(str(workspace[0] / "rtdetr-tiny-revcol.yaml")), workspace, "rtdetr")


@pytest.fixture(scope="module")
def yolo(workspace):
    return _train(YOLO(str(workspace[0] / "yolo-tiny-revcol.yaml")), workspace, "yolo")


@pytest.fixture(params=["rtdetr", "yolo"])
def trained(request):
    return request.getfixturevalue(request.param)


def _boxes(model, image) -> list:
    return model.predict(image, imgsz=IMGSZ, conf=0.0, verbose=False)[0].boxes.data.tolist()


PREDICT = """
import json, sys
from ultralytics import RTDETR, YOLO
cls = RTDETR if "rtdetr" in sys.argv[1] else YOLO
result = cls(sys.argv[1]).predict(sys.argv[2], imgsz={imgsz}, conf=0.0, verbose=False)[0]
print(json.dumps({{"boxes": result.boxes.data.tolist(), "revcol_imported_by_load": "revcol" in sys.modules}}))
"""


def _predict_in_fresh_process(weights, image, prelude="", env=None) -> dict:
    script = prelude + PREDICT.format(imgsz=IMGSZ)
    env = {**os.environ, "YOLO_OFFLINE": "true", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", script, str(weights), str(image)], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_writes_best_and_uses_revcol_trainer(trained):
    best = Path(trained.trainer.best)
    assert best.is_file() and best.name == "best.pt"
    assert type(trained.trainer) in (RevColRTDETRTrainer, RevColDetectionTrainer)
    assert isinstance(trained.model.model[0], RevColBackbone)


def test_training_updates_backbone_weights(trained):
    after = trained.model.model[0].state_dict()  # best.pt, loaded back after training
    before = BACKBONE_BEFORE["rtdetr" if isinstance(trained, RTDETR) else "yolo"]
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert "stem.0.weight" in changed
    assert len(changed) >= 0.9 * len(before), sorted(set(before) - set(changed))


def test_optimizer_groups_exempt_alphas_and_gammas(trained):
    decay = {id(p): g["weight_decay"] for g in trained.trainer.optimizer.param_groups for p in g["params"]}
    special = no_decay_parameters(trained.trainer.model)
    assert special and all(decay[id(p)] == 0.0 for p in special)
    assert max(decay.values()) > 0


def test_val_returns_metrics(trained, workspace):
    root, data = workspace
    metrics = trained.val(
        data=str(data), imgsz=IMGSZ, batch=4, workers=0, plots=False, verbose=False, project=str(root / "runs")
    )
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert "metrics/mAP50(B)" in metrics.results_dict


def test_best_pt_predicts_same_boxes_in_fresh_processes(trained, workspace):
    image = next((workspace[1].parent / "images" / "val").glob("*.png"))
    best = Path(trained.trainer.best)
    expected = _boxes(type(trained)(str(best)), str(image))
    assert expected, "predict returned no boxes"

    plain = _predict_in_fresh_process(best, image)
    assert plain["revcol_imported_by_load"]  # unpickling the model imported (and registered) revcol itself
    np.testing.assert_allclose(plain["boxes"], expected, atol=1e-4)

    safe = _predict_in_fresh_process(best, image, prelude="import revcol\n", env={"ULTRALYTICS_SAFE_LOAD": "1"})
    np.testing.assert_allclose(safe["boxes"], expected, atol=1e-4)


def test_safe_load_refuses_without_revcol(trained):
    script = textwrap.dedent(
        f"""
        from ultralytics import RTDETR
        try:
            RTDETR({str(trained.trainer.best)!r})
        except Exception as e:
            print("refused:", type(e).__name__)
        """
    )
    env = {**os.environ, "YOLO_OFFLINE": "true", "ULTRALYTICS_SAFE_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert "refused:" in out.stdout


def test_onnx_export_matches_pytorch(trained):
    import onnxruntime

    model = type(trained)(str(trained.trainer.best))
    path = model.export(format="onnx", imgsz=IMGSZ, verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    (onnx_out, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch_model = type(trained)(str(trained.trainer.best)).model.eval()
    with torch.no_grad():
        torch_out = torch_model(x)
    torch_out = torch_out[0] if isinstance(torch_out, (list, tuple)) else torch_out
    assert onnx_out.shape == tuple(torch_out.shape)
    assert np.abs(onnx_out - torch_out.numpy()).max() <= 1e-4


def test_ddp_worker_registers_revcol_in_a_fresh_interpreter(rtdetr):
    from ultralytics.utils.dist import generate_ddp_file

    file = Path(generate_ddp_file(rtdetr.trainer))
    try:
        source = file.read_text()
        assert "revcol" not in source  # nothing of ours is spelled out: it comes from the pickled trainer
        # Run the worker file up to (not including) training: load its state as the worker does.
        check = source.split("    trainer = state")[0] + textwrap.indent(
            textwrap.dedent(
                """
                import ultralytics.nn.tasks as tasks
                import revcol
                assert state["trainer"].__module__ == "revcol.trainers", state["trainer"]
                assert revcol.is_registered() and "RevColBackbone" in vars(tasks)
                print("registered in worker:", state["trainer"].__name__)
                """
            ),
            "    ",
        )
        out = subprocess.run(
            [sys.executable, "-c", check], capture_output=True, text=True, env={**os.environ, "YOLO_OFFLINE": "true"}
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "registered in worker: RevColRTDETRTrainer" in out.stdout
    finally:
        file.unlink(missing_ok=True)
        file.with_suffix(".pt").unlink(missing_ok=True)
