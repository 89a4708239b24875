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

from revcol import FullNet
from revcol.demo import generate_dataset
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.trainers import RevColDetectionTrainer, RevColRTDETRTrainer, no_decay_parameters

IMGSZ = 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    (root / "rtdetr-tiny-revcol.yaml").write_text(TINY_RTDETR_YAML)
    (root / "yolo-tiny-revcol.yaml").write_text(TINY_YOLO_YAML)
    return root, generate_dataset(root / "data", n_train=8, n_val=4, imgsz=IMGSZ, seed=0)


# Backbone weights of each run when training starts and ends, by run name and event (a module-level function keeps
# the callbacks picklable, as Ultralytics' DDP launcher pickles the trainer with them). In memory, in float32:
# best.pt holds float16 weights, which would hide the small first steps of a short run.
BACKBONE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def _snapshot_backbone(name, event, trainer):
    BACKBONE[name, event] = {k: v.detach().clone() for k, v in trainer.model.model[0].state_dict().items()}


def _train(model, workspace, name):
    root, data = workspace
    for event in ("on_train_start", "on_train_end"):
        model.add_callback(event, functools.partial(_snapshot_backbone, name, event))
    model.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
        project=str(root / "runs"), name=name, exist_ok=True, amp=False, verbose=False,
        nbs=4,  # nominal batch = batch: an optimizer step every iteration (default 64 would accumulate 16)
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
    name = "rtdetr" if isinstance(trained, RTDETR) else "yolo"
    before, after = BACKBONE[name, "on_train_start"], BACKBONE[name, "on_train_end"]
    assert set(after) == set(before) == set(trained.model.model[0].state_dict())
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    # The first column's alphas multiply zeros, so they get no gradient. A few norm weights may not move either:
    # behind a layer scale of 1e-6 their gradients are so small that Adam's eps swallows them in two steps.
    first_column_alphas = {f"subnet0.alpha{level}" for level in range(4)}
    assert first_column_alphas <= unchanged
    assert all(k.endswith("norm.weight") for k in unchanged - first_column_alphas), sorted(unchanged)
    assert len(unchanged) <= 0.1 * len(before), sorted(unchanged)


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

    safe = _predict_in_fresh_process(best, image, prelude="import revcol\n", env={"ULTRALYTICS_SAFE_LOAD": "true"})
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
    env = {**os.environ, "YOLO_OFFLINE": "true", "ULTRALYTICS_SAFE_LOAD": "true"}
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
    """The file Ultralytics' DDP launcher runs in every worker rebuilds a RevCol trainer, with revcol registered."""
    from ultralytics.utils.dist import generate_ddp_file

    file = Path(generate_ddp_file(rtdetr.trainer))
    # Run the worker file as the launcher does, in a fresh interpreter, and stop where training would begin.
    check = textwrap.dedent(
        f"""
        import runpy, sys
        from ultralytics.engine.trainer import BaseTrainer

        def report(trainer):
            import revcol
            import ultralytics.nn.tasks as tasks

            registered = revcol.is_registered() and "RevColBackbone" in vars(tasks)
            print("worker:", type(trainer).__module__, type(trainer).__name__, "registered:", registered)

        assert "revcol" not in sys.modules
        BaseTrainer.train = report
        runpy.run_path({str(file)!r}, run_name="__main__")
        """
    )
    try:
        env = {**os.environ, "YOLO_OFFLINE": "true"}
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "worker: revcol.ultralytics.trainers RevColRTDETRTrainer registered: True" in out.stdout
    finally:
        file.unlink(missing_ok=True)
        file.with_suffix(".pt").unlink(missing_ok=True)


class _StopAfterFirstEpoch(Exception):
    """Raised from a callback once last.pt of epoch 1 is written: a run that can be resumed."""


def _stop(trainer):
    raise _StopAfterFirstEpoch


def test_trained_model_never_needs_its_pretrained_file_again(workspace, tmp_path):
    """Fine-tune, resume, val, predict and export from a .pt whose YAML names an ImageNet file that is gone."""
    data = workspace[1]
    imagenet = tmp_path / "imagenet.pth"
    torch.save({"model": FullNet([8, 16, 32, 64], [1, 1, 1, 1], 2).state_dict()}, imagenet)
    yaml_file = tmp_path / "pretrained-rtdetr.yaml"
    yaml_file.write_text(TINY_RTDETR_YAML.replace("drop_path: 0.1}", f"drop_path: 0.1, pretrained: {imagenet}}}"))
    common = {"data": str(data), "imgsz": IMGSZ, "batch": 4, "workers": 0, "device": "cpu", "plots": False,
              "amp": False, "verbose": False, "exist_ok": True, "project": str(tmp_path / "runs")}  # fmt: skip

    first = RTDETR(str(yaml_file))
    first.add_callback("on_fit_epoch_end", _stop)
    with pytest.raises(_StopAfterFirstEpoch):
        first.train(epochs=2, name="first", **common)
    last = tmp_path / "runs" / "first" / "weights" / "last.pt"
    imagenet.unlink()  # from here on, any read of it fails with "checkpoint not found"

    RTDETR(str(last)).train(resume=True)  # finishes epoch 2 of the interrupted run
    best = tmp_path / "runs" / "first" / "weights" / "best.pt"
    RTDETR(str(best)).train(epochs=1, name="finetune", **common)
    model = RTDETR(str(best))
    assert model.val(**{k: v for k, v in common.items() if k != "amp"}).box.map50 >= 0.0
    assert model.predict(next((data.parent / "images" / "val").glob("*.png")), imgsz=IMGSZ, verbose=False)
    assert Path(model.export(format="onnx", imgsz=IMGSZ, verbose=False)).is_file()
