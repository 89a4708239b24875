"""Every Ultralytics trainer trains a RevCol model the RevCol way; the authors' layer-wise lr decay.

Task trainers are checked where they choose the trainer (a callback stops ``model.train`` right after the trainer
is built) and through ``get_model`` / ``build_optimizer``; full task trainings live in ``test_tasks.py``. One short
real training (2 epochs on 8 generated images) checks that the lr ratios survive Ultralytics' warmup and schedule.
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
import ultralytics
from revcol_helpers import TINY_BACKBONE, TINY_YOLO_YAML, tiny_yaml
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.checks import check_version

from revcol import ConfigError, FullNet, RevColBackbone
from revcol.core.param_groups import depth_map, layer_id, lr_scale, num_layers
from revcol.demo import generate_dataset
from revcol.ultralytics import hooks, trainers
from revcol.ultralytics.trainers import (
    TRAINERS,
    RevColClassificationTrainer,
    RevColDetectionTrainer,
    RevColOBBTrainer,
    RevColPoseTrainer,
    RevColSegmentationTrainer,
    RevColSemanticSegmentationTrainer,
    no_decay_parameters,
)

IMGSZ = 64
HAS_DEPTH = check_version(ultralytics.__version__, ">=8.4.104")
HEADS = {
    "detect": "[[10, 7, 4], 1, Detect, [nc]]",
    "segment": "[[10, 7, 4], 1, Segment, [nc, 32, 16]]",
    "pose": "[[10, 7, 4], 1, Pose, [nc, kpt_shape]]",
    "obb": "[[10, 7, 4], 1, OBB, [nc, 1]]",
    "semantic": "[[10, 7], 1, SemanticSegment, [nc]]",
    "depth": "[[10, 7, 4], 1, Depth, [16]]",
}
TASK_TRAINERS = {
    "detect": RevColDetectionTrainer,
    "segment": RevColSegmentationTrainer,
    "pose": RevColPoseTrainer,
    "obb": RevColOBBTrainer,
    "classify": RevColClassificationTrainer,
    "semantic": RevColSemanticSegmentationTrainer,
    **({"depth": trainers.RevColDepthTrainer} if HAS_DEPTH else {}),
}


def task_yaml(task: str, backbone: str = TINY_BACKBONE) -> str:
    """A tiny model YAML of ``task`` on the tiny RevCol backbone."""
    if task == "classify":
        return tiny_yaml("[4, 1, Classify, [nc]]  # 5", backbone=backbone, neck="")
    return tiny_yaml(HEADS[task], backbone=backbone, extra="kpt_shape: [3, 3]\n" if task == "pose" else "")


def backbone_with(options: str) -> str:
    """The tiny RevCol backbone row with more options, e.g. ``backbone_with("lr_decay: 0.5")``."""
    return TINY_BACKBONE.replace("drop_path: 0.1}", f"drop_path: 0.1, {options}}}")


def write_yaml(tmp_path: Path, task: str, backbone: str = TINY_BACKBONE, name: str = "tiny") -> str:
    path = tmp_path / f"{name}-revcol-{task}.yaml"
    path.write_text(task_yaml(task, backbone))
    return str(path)


def bare_trainer(cls: type) -> DetectionTrainer:
    """A trainer with just what ``get_model`` and ``build_optimizer`` read: no dataset, no run folder."""
    trainer = object.__new__(cls)
    trainer.args = get_cfg(DEFAULT_CFG)
    trainer.data = {"nc": 3, "channels": 3, "names": {0: "a", 1: "b", 2: "c"}, "kpt_shape": [3, 3]}
    trainer.resume = False
    return trainer


class UserDetectionTrainer(DetectionTrainer):
    """A user's trainer that knows nothing of RevCol (module level: Ultralytics' DDP imports it by path)."""


class UserSegmentationTrainer(SegmentationTrainer):
    """A user's trainer overriding get_model and calling super, as subclasses usually do."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        model.built_by_user_trainer = True
        return model


# --- which trainers ---------------------------------------------------------------------------------------------


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
    """A trainer class Ultralytics defines after revcol was imported: importable as revcol.ultralytics.trainers.RevCol<name>."""

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


# --- the depth map ---------------------------------------------------------------------------------------------

# layers [1, 2, 1, 1] (5 block rows, levels start at rows 0, 1, 3, 4) and 3 columns, by hand:
# dp[i][j] = min(dp[i][j-1], dp[i-1][j]) + 1 from dp[i][0] = i, dp[0][j] = j, then + 1 everywhere.
LAYERS, COLUMNS = [1, 2, 1, 1], 3
HAND_DP = [
    [1, 2, 3],
    [2, 3, 4],
    [3, 4, 5],
    [4, 5, 6],
    [5, 6, 7],
]
HAND_IDS = {
    "stem.0.weight": 0,
    "stem.1.bias": 0,
    "subnet0.alpha0": 1,
    "subnet2.alpha3": 3,  # every alpha of a column sits at the column's first row
    "subnet0.level0.blocks.0.dwconv.weight": 1,
    "subnet1.level1.blocks.0.pwconv1.weight": 3,  # row 1
    "subnet1.level1.blocks.1.gamma": 4,  # row 2
    "subnet2.level3.blocks.0.norm.bias": 7,  # row 4, the last block
    "subnet0.level2.fusion.down.0.weight": 4,  # level 2 starts at row 3
    "subnet2.level0.fusion.up.channel_reschedule.0.weight": 3,
    "model.5.cv1.conv.weight": 8,  # outside the backbone: dp[-1][-1] + 1
}


def test_depth_map_matches_the_hand_computed_table():
    assert depth_map(LAYERS, COLUMNS) == HAND_DP
    assert num_layers(LAYERS, COLUMNS) == 9
    assert depth_map([2, 2, 4, 2], 8)[-1][-1] == 10 + 8 - 1  # RevCol-S: 10 block rows, 8 columns


@pytest.mark.parametrize(("name", "expected"), HAND_IDS.items())
def test_layer_ids_and_lr_scales(name, expected):
    assert layer_id(name, LAYERS, COLUMNS) == expected
    assert lr_scale(name, LAYERS, COLUMNS, 0.5) == 0.5 ** (9 - expected - 1)


def test_every_backbone_parameter_has_a_depth_and_the_head_keeps_the_base_lr():
    net = FullNet([8, 16, 24, 32], LAYERS, COLUMNS)
    ids = {name: layer_id(name, LAYERS, COLUMNS) for name, _ in net.named_parameters()}
    assert set(ids.values()) == set(range(8))  # stem 0 ... the last column's last block 7
    assert lr_scale("model.9.weight", LAYERS, COLUMNS, 0.85) == 1.0
    with pytest.raises(ValueError, match=r"subnet0\.unknown"):
        layer_id("subnet0.unknown", LAYERS, COLUMNS)


# --- the option --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.85, 1, 0.01])
def test_lr_decay_option_is_stored_on_the_backbone(rate):
    custom = {"channels": [8, 16, 24, 32], "layers": [1] * 4, "num_subnet": 2}
    backbone = RevColBackbone("revcol", {**custom, "lr_decay": rate})
    assert backbone.lr_decay == rate and isinstance(backbone.lr_decay, float)
    assert RevColBackbone("revcol", custom).lr_decay is None


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, "0.85", True, None])
def test_lr_decay_must_be_a_number_in_0_1(rate, tmp_path):
    if rate is None:  # YAML's null: the option given without a value
        yaml = write_yaml(tmp_path, "detect", backbone_with("lr_decay: null"))
        assert YOLO(yaml).model.model[0].lr_decay is None
        return
    with pytest.raises(ConfigError, match=r"lr_decay must be a number in \(0, 1\]"):
        RevColBackbone("revcol_tiny", {"lr_decay": rate})  # refused before the network is built


def test_lr_decay_from_the_yaml_line_and_as_an_attribute(tmp_path):
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.7"))).model
    assert model.model[0].lr_decay == 0.7
    backbone = model.model[0]
    backbone.lr_decay = 0.5  # set from Python after building: the trainer reads it when it builds the optimizer
    scales = _scales_of(bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="SGD", lr=1.0), model)
    assert scales[id(backbone.stem[0].weight)] == 0.5**6  # 2 columns, 4 rows: num_layers 7
    backbone.lr_decay = 2.0
    with pytest.raises(ConfigError, match="lr_decay"):
        bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="SGD", lr=1.0)


def _scales_of(optimizer, model) -> dict[int, float]:
    """``id(parameter) -> its group's lr / base lr`` (base: the lr of the head's weight group)."""
    head = model.model[-1].cv2[0][0].conv.weight
    head_lr = next(g["lr"] for g in optimizer.param_groups for p in g["params"] if p is head)
    return {id(p): g["lr"] / head_lr for g in optimizer.param_groups for p in g["params"]}


def test_build_optimizer_scales_every_backbone_parameter_by_its_depth(tmp_path):
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.5"))).model
    optimizer = bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="AdamW", lr=0.01, decay=5e-4)
    scales, backbone = _scales_of(optimizer, model), model.model[0]
    assert len(scales) == sum(1 for _ in model.parameters())
    for name, p in backbone.named_parameters():
        assert scales[id(p)] == pytest.approx(lr_scale(name, [1] * 4, 2, 0.5), rel=1e-12), name
    head = [p for i, m in enumerate(model.model) if i >= 5 for p in m.parameters()]
    assert head and all(scales[id(p)] == 1.0 for p in head)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == 0.0 for p in no_decay_parameters(model))
    assert decay[id(backbone.stem[0].weight)] == 5e-4  # the split keeps each group's weight decay


# --- every trainer -------------------------------------------------------------------------------------------------


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


TRAINER_CASES = [*TASK_TRAINERS.items(), ("detect", UserDetectionTrainer), ("segment", UserSegmentationTrainer)]


@pytest.mark.parametrize(("task", "cls"), TRAINER_CASES, ids=[c.__name__ for _, c in TRAINER_CASES])
def test_every_trainer_exempts_alphas_gammas_and_norms_and_decays_lr(task, cls, tmp_path):
    yaml = write_yaml(tmp_path, task, backbone_with("lr_decay: 0.5"))
    model = bare_trainer(cls).get_model(cfg=yaml, verbose=False)
    optimizer = bare_trainer(cls).build_optimizer(model, name="SGD", lr=0.1, momentum=0.9, decay=5e-4)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    backbone = model.model[0]
    norms = [m.weight for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    special = no_decay_parameters(model)
    assert len(special) == 4 * 2 + 4 * 2 and norms
    assert all(groups[id(p)]["weight_decay"] == 0.0 for p in special + norms)
    stem, head = groups[id(backbone.stem[0].weight)], groups[id(next(model.model[-1].parameters()))]
    assert stem["weight_decay"] == 5e-4
    assert stem["lr"] == pytest.approx(0.1 * 0.5**6) and head["lr"] == 0.1


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

    A user's trainer lives in an importable module (here this one, on PYTHONPATH) as Ultralytics requires.
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
    plain_rows = "\n".join(f"  - [-1, 1, Conv, [{c}, 3, 2]]" for c in (16, 16, 16, 32, 64))  # strides 2-32
    plain_yaml.write_text(TINY_YOLO_YAML.replace(f"  - {TINY_BACKBONE}  # 0-4", plain_rows))  # no RevCol
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


# --- lr ratios through Ultralytics' warmup and scheduler -----------------------------------------------------------

LR_LOG: list[dict] = []  # per training batch: the epoch and each group's lr, initial_lr, kind and parameter ids


def _log_lrs(trainer):
    groups = [
        (g["lr"], g["initial_lr"], g["param_group"], {id(p) for p in g["params"]})
        for g in trainer.optimizer.param_groups
    ]
    LR_LOG.append({"epoch": trainer.epoch, "groups": groups, "model": trainer.model})


@pytest.mark.parametrize("warmup_bias_lr", [0.0, 0.1])
def test_lr_ratios_survive_warmup_and_schedule_in_a_real_training(tmp_path, warmup_bias_lr):
    """2 epochs, 2 batches each, 1 warmup epoch; a user trainer, so the hooks (not a RevCol class) do the work.

    Ultralytics starts every bias group's warmup at the same ``warmup_bias_lr``; with 0 (the recipe, and what
    ``optimizer=auto`` sets) every group keeps its ratio throughout, otherwise the bias groups only after warmup.
    """
    data = generate_dataset(tmp_path / "data", n_train=8, n_val=2, imgsz=IMGSZ, seed=0)
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.5")))
    model.add_callback("on_train_batch_end", _log_lrs)
    LR_LOG.clear()
    model.train(
        data=str(data), epochs=2, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
        project=str(tmp_path / "runs"), name="lr", exist_ok=True, verbose=False, val=False, nbs=4,
        optimizer="AdamW", lr0=0.002, lrf=0.5, warmup_epochs=1, warmup_bias_lr=warmup_bias_lr,
        trainer=UserDetectionTrainer,
    )  # fmt: skip
    assert len(LR_LOG) == 4 and LR_LOG[0]["epoch"] == 0 and LR_LOG[-1]["epoch"] == 1
    trained = LR_LOG[0]["model"]
    stem, head = id(trained.model[0].stem[0].weight), id(trained.model[-1].cv2[0][0].conv.weight)
    expected = 0.5 ** (num_layers([1] * 4, 2) - 1)
    factors = []
    for entry in LR_LOG:
        # every group follows the same warmup / schedule factor, so all ratios (not only the stem's) hold
        compared = [
            (lr, initial)
            for lr, initial, kind, ids in entry["groups"]
            if ids and (kind != "bias" or not warmup_bias_lr)
        ]
        group_factors = {round(lr / initial, 12) for lr, initial in compared}
        assert len(compared) > 10 and len(group_factors) == 1, group_factors
        factors.append(group_factors.pop())
        lr_of = {pid: lr for lr, _, _, ids in entry["groups"] for pid in ids}
        if factors[-1]:  # warmup starts every lr at 0
            assert lr_of[stem] / lr_of[head] == pytest.approx(expected, rel=1e-9)
    # batch 1 is in warmup (lrs still rising) in both releases; warmup and the schedule both moved the lrs
    assert 0 == factors[0] < factors[1] < max(factors) and len(set(factors)) >= 3, factors
