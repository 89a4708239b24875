"""Every Ultralytics trainer trains a RevCol model the RevCol way (``revcol.ultralytics.trainers``): the RevCol trainer
classes, the model built for trained weights, the DDP worker.

Task trainers are checked where they choose the trainer (a callback stops ``model.train`` right after the trainer
is built) and through ``get_model``; full task trainings live in ``test_tasks.py``. The optimizer's param groups:
``test_ultralytics_trainers_optimizer.py``; checkpoints written atomically: ``test_ultralytics_trainers_saves.py``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.plugin import HAS_DEPTH, TASK_TRAINERS, UserDetectionTrainer, UserSegmentationTrainer, bare_trainer
from helpers.yamls import IMGSZ, TINY_YOLO_YAML, backbone_with, without_revcol, write_yaml
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer

from revcol.demo import generate_dataset
from revcol.ultralytics import hooks, trainers
from revcol.ultralytics.trainers import (
    TRAINERS,
    RevColClassificationTrainer,
    RevColSegmentationTrainer,
    RevColSemanticSegmentationTrainer,
)


def test_every_trainer_of_the_installed_ultralytics_task_maps_is_covered(tmp_path):
    """Derived from Ultralytics itself: each task map's trainer has its RevCol class and the get_model hook."""
    from ultralytics import RTDETR

    task_maps = [YOLO(write_yaml(tmp_path, "detect")).task_map, RTDETR("rtdetr-revcol-cpu.yaml").task_map]
    by_task = {task: entry["trainer"] for task_map in task_maps for task, entry in task_map.items()}
    assert {"detect", "segment", "pose", "obb", "classify", "semantic"} <= set(by_task)
    assert ("depth" in by_task) == HAS_DEPTH  # 8.4.190: semantic and depth; 8.4.67: semantic only
    get_model = next(h for h in hooks.HOOKS if h.name == "get_model")
    wrapped = set(hooks.owners(get_model))
    for task_map in task_maps:
        for task, entry in task_map.items():
            trainer = entry["trainer"]
            made = TRAINERS[trainer]
            assert made.__name__ == f"RevCol{trainer.__name__}" and getattr(trainers, made.__name__) is made, task
            assert issubclass(made, trainer) and made.__module__ == "revcol.ultralytics.trainers"
            definer = next(c for c in trainer.__mro__ if "get_model" in vars(c))
            assert definer in wrapped and hasattr(vars(definer)["get_model"], "__wrapped__"), task


def test_a_trainer_defined_later_gets_its_revcol_class_by_name():
    """A trainer class Ultralytics defines after revcol was imported: importable as ``trainers.RevCol<name>``."""

    later = type("LaterTrainer", (DetectionTrainer,), {"__module__": "ultralytics.models.yolo.later"})
    try:
        made = trainers.RevColLaterTrainer
        assert issubclass(made, later) and made.__name__ == "RevColLaterTrainer"
        assert trainers.revcol_trainer(later) is made
        with pytest.raises(AttributeError):
            trainers.RevColNoSuchTrainer  # noqa: B018
    finally:
        trainers._made.pop(later, None)
        vars(trainers).pop("RevColLaterTrainer", None)


class _TrainerChosen(Exception):
    """Raised by a callback as soon as ``model.train`` has built its trainer."""


def _stop_with_type(trainer):
    raise _TrainerChosen(type(trainer))


def _trainer_model_train_builds(model: YOLO, tmp_path: Path, **kwargs) -> type:
    model.add_callback("on_pretrain_routine_start", _stop_with_type)  # runs before the dataset is read
    with pytest.raises(_TrainerChosen) as stopped:
        model.train(data=str(tmp_path / "unused.yaml"), project=str(tmp_path / "runs"), device="cpu", **kwargs)
    return stopped.value.args[0]


@pytest.mark.parametrize("task", TASK_TRAINERS)
def test_model_train_uses_the_revcol_trainer_of_every_task(task, tmp_path):
    model = YOLO(write_yaml(tmp_path, task), task=task)
    assert model._smart_load("trainer") is TASK_TRAINERS[task]
    assert _trainer_model_train_builds(model, tmp_path) is TASK_TRAINERS[task]


def test_model_train_keeps_a_user_trainer(tmp_path):
    model = YOLO(write_yaml(tmp_path, "detect"))
    assert _trainer_model_train_builds(model, tmp_path, trainer=UserDetectionTrainer) is UserDetectionTrainer


SKIP_PRETRAINED_CASES = [
    ("segment", RevColSegmentationTrainer), ("segment", UserSegmentationTrainer),
    ("classify", RevColClassificationTrainer), ("semantic", RevColSemanticSegmentationTrainer),
    *([("depth", trainers.RevColDepthTrainer)] if HAS_DEPTH else []),
]  # fmt: skip


@pytest.mark.parametrize(("task", "cls"), SKIP_PRETRAINED_CASES, ids=[c.__name__ for _, c in SKIP_PRETRAINED_CASES])
def test_model_about_to_get_trained_weights_skips_its_pretrained_file(task, cls, tmp_path):
    gone = tmp_path / "imagenet-gone.pth"
    yaml = write_yaml(tmp_path, task, backbone_with(f"pretrained: {gone}"), "pretrained")
    with pytest.raises(Exception, match="imagenet-gone"):  # building it from the YAML alone reads the file
        bare_trainer(cls).get_model(cfg=yaml, verbose=False)
    trained = YOLO(write_yaml(tmp_path, task), task=task).model
    model = bare_trainer(cls).get_model(cfg=yaml, weights=trained, verbose=False)
    assert torch.equal(model.model[0].stem[0].weight, trained.model[0].stem[0].weight)
    assert getattr(model, "built_by_user_trainer", False) == (cls is UserSegmentationTrainer)


def run_worker_file(file: Path, module_dir: Path) -> str:
    """Run Ultralytics' DDP worker ``file`` in a fresh interpreter, stopping where training would begin.

    Returns what the worker printed: its trainer class and whether revcol is registered there. ``module_dir``
    (where the trainer's module is) goes on PYTHONPATH, as it must for a real launch.
    """
    check = textwrap.dedent(
        f"""
        import runpy, sys
        from ultralytics.engine.trainer import BaseTrainer

        def report(trainer):
            import revcol

            print("worker:", type(trainer).__name__, "registered:", revcol.is_registered())

        assert "revcol" not in sys.modules
        BaseTrainer.train = report
        runpy.run_path({str(file)!r}, run_name="__main__")
        """
    )
    path = os.pathsep.join(filter(None, [str(module_dir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "YOLO_OFFLINE": "true", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize(("task", "cls"), [("segment", RevColSegmentationTrainer), ("detect", UserDetectionTrainer)])
def test_ddp_worker_imports_revcol(task, cls, tmp_path):
    """The file Ultralytics' DDP launcher runs rebuilds the trainer with revcol registered, in a fresh interpreter.

    A user's trainer lives in an importable module (here ``helpers.plugin``, tests/ on PYTHONPATH) as Ultralytics
    requires.
    """
    from ultralytics.utils.dist import generate_ddp_file

    data = generate_dataset(tmp_path / "data", n_train=1, n_val=1, imgsz=IMGSZ)
    trainer = cls(overrides={"model": write_yaml(tmp_path, task), "data": str(data), "project": str(tmp_path / "runs")})
    file = Path(generate_ddp_file(trainer))
    try:
        assert f"worker: {cls.__name__} registered: True" in run_worker_file(file, Path(__file__).parent)
    finally:
        file.unlink(missing_ok=True)
        file.with_suffix(".pt").unlink(missing_ok=True)


USER_MODULE = """
from ultralytics.models.yolo.detect import DetectionTrainer


class PlainTrainer(DetectionTrainer):
    \"\"\"A user's trainer in a module that never imports revcol.\"\"\"
"""


def imported_modules(source: str) -> set[str]:
    """The top-level module names that Python ``source`` imports (read from its syntax tree, not its text)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_ddp_worker_of_a_user_trainer_that_never_imports_revcol_registers_it(tmp_path, monkeypatch):
    """The worker file itself imports revcol when the run trains a RevCol model; otherwise it is left alone.

    Everything lives in a folder named ``revcol`` under a path with a space, as a clone of this repository may:
    Ultralytics writes the run's paths (and, in recent releases, ``sys.path``) into the worker file, so the word is
    in both files and only what they import tells them apart.
    """
    from ultralytics.utils.dist import generate_ddp_file

    root = tmp_path / "my projects" / "revcol"
    root.mkdir(parents=True)
    (root / "user_trainers.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(root))
    from user_trainers import PlainTrainer

    data = generate_dataset(root / "data", n_train=1, n_val=1, imgsz=IMGSZ)
    overrides = {"data": str(data), "project": str(root / "runs")}
    revcol_run = PlainTrainer(overrides={**overrides, "model": write_yaml(root, "detect")})
    plain_yaml = root / "plain.yaml"
    plain_yaml.write_text(without_revcol(TINY_YOLO_YAML))
    files = [Path(generate_ddp_file(revcol_run))]
    try:
        assert files[0].read_text().startswith("import revcol")
        assert "worker: PlainTrainer registered: True" in run_worker_file(files[0], root)
        files.append(Path(generate_ddp_file(PlainTrainer(overrides={**overrides, "model": str(plain_yaml)}))))
        plain_file = files[1].read_text()
        assert str(root) in plain_file  # the folder's name is in the text
        assert "revcol" not in imported_modules(plain_file)  # a model without a RevCol backbone: Ultralytics' file
        assert "revcol" in imported_modules(files[0].read_text())
    finally:
        for file in files:
            file.unlink(missing_ok=True)
            file.with_suffix(".pt").unlink(missing_ok=True)
