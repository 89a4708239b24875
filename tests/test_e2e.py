"""End to end with Ultralytics on CPU, offline: train, val, predict, reload, safe load, DDP file, resume.

The two tiny detectors (``helpers.training.DETECTORS``) train once per test process (the ``trained`` fixture); the
ONNX parity of their ``best.pt`` is ``test_export.py``'s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import TINY_CONFIG
from helpers.training import DETECTORS, FreshPrediction, Run, predict_in_fresh_processes
from helpers.yamls import IMGSZ, TINY_RTDETR_YAML
from ultralytics import RTDETR

from revcol import FullNet
from revcol.demo import generate_dataset
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.trainers import RevColDetectionTrainer, RevColRTDETRTrainer, no_decay_parameters


@pytest.fixture(params=["rtdetr", "yolo"])
def detector(request, trained) -> Run:
    return trained(request.param)


def _boxes(model, image) -> list:
    return model.predict(image, imgsz=IMGSZ, conf=0.0, verbose=False)[0].boxes.data.tolist()


def test_train_writes_best_and_uses_revcol_trainer(detector):
    trained = detector.model
    best = Path(trained.trainer.best)
    assert best.is_file() and best.name == "best.pt"
    assert type(trained.trainer) in (RevColRTDETRTrainer, RevColDetectionTrainer)
    assert isinstance(trained.model.model[0], RevColBackbone)


def test_training_updates_backbone_weights(detector):
    before, after = detector.backbone("on_train_start"), detector.backbone("on_train_end")
    assert set(after) == set(before) == set(detector.model.model.model[0].state_dict())
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    # The first column's alphas multiply zeros, so they get no gradient. A few norm weights may not move either:
    # behind a layer scale of 1e-6 their gradients are so small that Adam's eps swallows them in two steps.
    first_column_alphas = {f"subnet0.alpha{level}" for level in range(4)}
    assert first_column_alphas <= unchanged
    assert all(k.endswith("norm.weight") for k in unchanged - first_column_alphas), sorted(unchanged)
    assert len(unchanged) <= 0.1 * len(before), sorted(unchanged)


def test_optimizer_groups_exempt_alphas_and_gammas(detector):
    trainer = detector.model.trainer
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    special = no_decay_parameters(trainer.model)
    assert special and all(decay[id(p)] == 0.0 for p in special)
    assert max(decay.values()) > 0


def test_val_returns_metrics(detector):
    metrics = detector.model.val(
        data=str(detector.data), imgsz=IMGSZ, batch=4, workers=0, plots=False, verbose=False,
        project=str(detector.root / "runs"),
    )  # fmt: skip
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert "metrics/mAP50(B)" in metrics.results_dict


@pytest.fixture(scope="module")
def fresh(trained, tmp_path_factory) -> dict[str, dict[str, FreshPrediction]]:
    """Both detectors' ``best.pt`` predicting in fresh processes: plainly, and with Ultralytics' weights-only
    loading (``ULTRALYTICS_SAFE_LOAD``), where a load before ``import revcol`` must be refused."""
    folder = tmp_path_factory.mktemp("fresh")
    runs = [trained(name) for name in DETECTORS]
    plain = {**os.environ, "YOLO_OFFLINE": "true"}
    safe = plain | {"ULTRALYTICS_SAFE_LOAD": "true"}
    return {
        "plain": predict_in_fresh_processes(runs, folder / "plain", plain),
        "safe": predict_in_fresh_processes(runs, folder / "safe", safe),
    }


def test_best_pt_predicts_same_boxes_in_fresh_processes(detector, fresh):
    expected = _boxes(type(detector.model)(str(detector.best)), str(detector.image))
    assert expected, "predict returned no boxes"

    plain = fresh["plain"][detector.name]
    assert plain.report is not None, plain.log[-3000:]
    assert plain.report["revcol_imported_by_load"]  # unpickling the model imported (and registered) revcol itself
    np.testing.assert_allclose(plain.arrays["boxes"], expected, atol=1e-4)

    # Ultralytics' weights-only loading: refused while revcol is not imported, the same boxes once it is
    safe = fresh["safe"][detector.name]
    assert safe.report is not None, safe.log[-3000:]
    assert safe.report["refused"] is not None
    np.testing.assert_allclose(safe.arrays["boxes"], expected, atol=1e-4)


def test_ddp_worker_registers_revcol_in_a_fresh_interpreter(trained):
    """The file Ultralytics' DDP launcher runs in every worker rebuilds a RevCol trainer, with revcol registered."""
    from ultralytics.utils.dist import generate_ddp_file

    file = Path(generate_ddp_file(trained("rtdetr").model.trainer))
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
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "worker: revcol.ultralytics.trainers RevColRTDETRTrainer registered: True" in out.stdout
    finally:
        file.unlink(missing_ok=True)
        file.with_suffix(".pt").unlink(missing_ok=True)


class _StopAfterFirstEpoch(Exception):
    """Raised from a callback once last.pt of epoch 1 is written: a run that can be resumed."""


def _stop(trainer):
    raise _StopAfterFirstEpoch


def test_trained_model_never_needs_its_pretrained_file_again(tmp_path):
    """Fine-tune, resume, val, predict and export from a .pt whose YAML names an ImageNet file that is gone."""
    data = generate_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=IMGSZ, seed=0)
    imagenet = tmp_path / "imagenet.pth"
    torch.save({"model": FullNet(**TINY_CONFIG).state_dict()}, imagenet)
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
