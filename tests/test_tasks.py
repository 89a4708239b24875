"""Segment, pose, OBB, classify, semantic, depth and the P2 detectors on a RevCol backbone, end to end on CPU, offline.

Each task trains a tiny model once on a generated dataset (``helpers.training``, ``helpers.task_data``), then: val,
predict, ``best.pt`` in a fresh process that never imported ``revcol``, and the trainer's weight-decay groups (the
ONNX parity of the trained ``best.pt`` is ``test_export.py``'s).
The shipped configs are too slow to train here; each is built once by bare name and run forward once.
Depth exists from Ultralytics 8.4.104: below that, the shipped config must fail with an error naming the version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.plugin import HAS_DEPTH
from helpers.processes import revcol_env
from helpers.training import RESULT_FIELDS, TASKS, FreshPrediction, Run, predict_in_fresh_processes
from helpers.yamls import IMGSZ
from ultralytics import RTDETR, YOLO

from revcol import ConfigError
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.trainers import no_decay_parameters

THRESHOLDED = ("masks", "semantic_mask")  # per-pixel decisions: a logit within float noise of a tie may flip


@pytest.fixture(scope="module", params=list(TASKS))
def run(request, trained) -> Run:
    """The task's tiny model, trained for an epoch on its dataset (``helpers.training.train``)."""
    return trained(request.param)


def prediction_arrays(model: YOLO, image: Path) -> dict[str, np.ndarray]:
    result = model.predict(str(image), imgsz=IMGSZ, conf=0.0, max_det=20, verbose=False)[0]
    return {f: getattr(result, f).data.numpy() for f in RESULT_FIELDS if getattr(result, f, None) is not None}


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
        if task.loader is RTDETR:  # the P2 heads see the stride-4 map
            assert layers[-1].nl == 4 and [p[0].in_channels for p in layers[-1].input_proj] == [256] * 4
        else:
            assert model.model.stride.tolist() == [4.0, 8.0, 16.0, 32.0]
    with torch.no_grad():
        model.model.eval()(torch.zeros(1, 3, 128, 128))


# From 8.4.104 the depth config is one of TASKS: test_shipped_config_builds_by_bare_name[depth] builds it.
@pytest.mark.skipif(HAS_DEPTH, reason="this Ultralytics has Depth (the config builds, see above)")
def test_depth_config_needs_ultralytics_8_4_104(tmp_path, monkeypatch):
    """On a release before 8.4.104 (the floor) an error that names the version it needs."""
    monkeypatch.chdir(tmp_path)
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


@pytest.fixture(scope="module")
def fresh(trained, tmp_path_factory) -> tuple[dict[str, FreshPrediction], Path]:
    """Every task's ``best.pt`` predicting in a fresh process of its own (forks of one fresh interpreter), offline
    and with network attempts logged; and that log's path."""
    folder = tmp_path_factory.mktemp("fresh")
    env = revcol_env(folder)
    runs = [trained(name) for name in TASKS]
    return predict_in_fresh_processes(runs, folder / "predictions", env, max_det=20), Path(env["REVCOL_NETWORK_LOG"])


def test_best_pt_predicts_the_same_in_a_fresh_process(run, fresh):
    expected = prediction_arrays(run.task.loader(str(run.best)), run.image)
    assert expected and all(a.size for a in expected.values()), f"predict returned nothing: {expected}"

    predictions, network_log = fresh
    prediction = predictions[run.name]
    assert prediction.report is not None, prediction.log[-3000:]
    report = {k: prediction.report[k] for k in ("revcol_imported_by_load", "task")}
    assert report == {"revcol_imported_by_load": True, "task": run.task.name}  # unpickling imported revcol
    assert not network_log.exists()

    fresh_arrays = prediction.arrays
    assert fresh_arrays.keys() == expected.keys()
    for field, value in expected.items():
        assert fresh_arrays[field].shape == value.shape, field
        if field in THRESHOLDED:
            assert np.mean(fresh_arrays[field] != value) <= 1e-3
        else:
            np.testing.assert_allclose(fresh_arrays[field], value, atol=1e-4, err_msg=field)
