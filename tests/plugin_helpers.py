"""Helpers of the Ultralytics plug-in's tests (``test_ultralytics_*.py``): the shipped RT-DETR config's dict with its
backbone row renamed, tiny task YAMLs on the tiny RevCol backbone, trainers without a run, and two user trainers
(at module level: Ultralytics' DDP worker imports a trainer by its module path).
"""

from __future__ import annotations

from pathlib import Path

import ultralytics
import yaml
from revcol_helpers import TINY_BACKBONE, tiny_yaml
from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.nn import tasks
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.checks import check_version

from revcol.ultralytics import trainers, yaml_rows
from revcol.ultralytics.trainers import (
    RevColClassificationTrainer,
    RevColDetectionTrainer,
    RevColOBBTrainer,
    RevColPoseTrainer,
    RevColSegmentationTrainer,
    RevColSemanticSegmentationTrainer,
)

SEED_YAML = yaml_rows.CONFIG_DIR / "rtdetr-revcol.yaml"


TINY = {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1], "num_subnet": 2}


def rtdetr_dict(name: str = "revcol", options: dict | None = None) -> dict:
    """The section-5 model dict with its backbone row renamed (and options set)."""
    d = yaml.safe_load(SEED_YAML.read_text())
    d["backbone"][0] = [-1, 1, name, [options] if options is not None else []]
    return d


def tiny_rtdetr(**options) -> tasks.RTDETRDetectionModel:
    return tasks.RTDETRDetectionModel(rtdetr_dict("revcol", {**TINY, **options}), verbose=False)


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


def without_revcol(model_yaml: str) -> str:
    """A tiny model YAML (``revcol_helpers``) with its RevCol row replaced by five plain convolutions, strides 2-32."""
    plain_rows = "\n".join(f"  - [-1, 1, Conv, [{c}, 3, 2]]" for c in (16, 16, 16, 32, 64))
    return model_yaml.replace(f"  - {TINY_BACKBONE}  # 0-4", plain_rows)


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
