"""Ultralytics objects for the plug-in's tests (``test_ultralytics_*.py``): the shipped RT-DETR config's dict with its
backbone row renamed, trainers without a run, and two users' trainers (at module level: Ultralytics' DDP worker
imports a trainer by its module path, ``helpers.plugin``, with tests/ on PYTHONPATH).
"""

from __future__ import annotations

import ultralytics
import yaml
from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.nn import tasks
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.checks import check_version

from helpers.yamls import TINY_OPTIONS
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
HAS_DEPTH = check_version(ultralytics.__version__, ">=8.4.104")


def rtdetr_dict(name: str = "revcol", options: dict | None = None) -> dict:
    """The section-5 model dict with its backbone row renamed (and options set)."""
    d = yaml.safe_load(SEED_YAML.read_text())
    d["backbone"][0] = [-1, 1, name, [options] if options is not None else []]
    return d


def tiny_rtdetr(**options) -> tasks.RTDETRDetectionModel:
    return tasks.RTDETRDetectionModel(rtdetr_dict("revcol", {**TINY_OPTIONS, **options}), verbose=False)


TASK_TRAINERS = {
    "detect": RevColDetectionTrainer,
    "segment": RevColSegmentationTrainer,
    "pose": RevColPoseTrainer,
    "obb": RevColOBBTrainer,
    "classify": RevColClassificationTrainer,
    "semantic": RevColSemanticSegmentationTrainer,
    **({"depth": trainers.RevColDepthTrainer} if HAS_DEPTH else {}),
}


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
