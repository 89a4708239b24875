"""Tiny Ultralytics model YAMLs (text; nothing here imports Ultralytics) on the tiny RevCol backbone of
``models.TINY_CONFIG``: the backbone row, an RT-DETR and a YOLO detector, and a model of each task."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import yaml

from helpers.models import TINY_CONFIG

IMGSZ = 64  # the side of the tiny models' images


def flow(options: Mapping) -> str:
    """``options`` in YAML's flow style, as a model YAML's row writes them: ``{channels: [8, 16, 24, 32], ...}``."""
    return yaml.safe_dump(dict(options), default_flow_style=True, sort_keys=False, width=math.inf).strip()


# TINY_CONFIG as a YAML row's options are read: lists where FullNet's keyword arguments hold tuples.
TINY_OPTIONS = yaml.safe_load(flow(TINY_CONFIG))


def revcol_row(options: Mapping) -> str:
    """A backbone row (layers 0-4) of a custom RevCol with ``options``."""
    return f"[-1, 1, revcol, [{flow(options)}]]"


# Detectors on the tiny backbone (reversible, with drop-path), trained end to end at IMGSZ.
TINY_BACKBONE = revcol_row({**TINY_CONFIG, "drop_path": 0.1})

# 10 queries: RT-DETR needs at least as many anchors as queries, and at 64 px there are 8*8 + 4*4 + 2*2 = 84.
TINY_RTDETR_YAML = f"""\
nc: 3
backbone:
  - {TINY_BACKBONE}  # 0-4
head:
  - [-1, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 5
  - [-1, 1, AIFI, [64, 2]]  # 6
  - [-1, 1, Conv, [32, 1, 1]]  # 7
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 8
  - [3, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 9
  - [[-2, -1], 1, Concat, [1]]  # 10
  - [-1, 1, RepC3, [32, 0.5]]  # 11
  - [-1, 1, Conv, [32, 1, 1]]  # 12
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 13
  - [2, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 14
  - [[-2, -1], 1, Concat, [1]]  # 15
  - [-1, 1, RepC3, [32, 0.5]]  # 16
  - [-1, 1, Conv, [32, 3, 2]]  # 17
  - [[-1, 12], 1, Concat, [1]]  # 18
  - [-1, 1, RepC3, [32, 0.5]]  # 19
  - [-1, 1, Conv, [32, 3, 2]]  # 20
  - [[-1, 7], 1, Concat, [1]]  # 21
  - [-1, 1, RepC3, [32, 0.5]]  # 22
  - [[16, 19, 22], 1, RTDETRDecoder, [nc, 32, 10, 2, 2, 1, 64]]  # 23
"""
# The neck of the tiny YOLO models: P5 (layer 4) upsampled and merged with P4 (layer 3) and P3 (layer 2).
TINY_NECK = """\
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 5
  - [[-1, 3], 1, Concat, [1]]  # 6
  - [-1, 1, C2f, [32]]  # 7
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 8
  - [[-1, 2], 1, Concat, [1]]  # 9
  - [-1, 1, C2f, [16]]  # 10 P3
"""


def tiny_yaml(head: str, *, backbone: str = TINY_BACKBONE, neck: str = TINY_NECK, nc: int = 3, extra: str = "") -> str:
    """A tiny YOLO-style model YAML: ``backbone`` (one row, layers 0-4), ``neck``, then the ``head`` row."""
    return f"nc: {nc}\n{extra}backbone:\n  - {backbone}  # 0-4\nhead:\n{neck}  - {head}\n"


TINY_YOLO_YAML = tiny_yaml("[[10, 7, 4], 1, Detect, [nc]]")


# Per task, the head row of its tiny model on TINY_NECK (P3, P4, P5: layers 10, 7, 4).
HEADS = {
    "detect": "[[10, 7, 4], 1, Detect, [nc]]",
    "segment": "[[10, 7, 4], 1, Segment, [nc, 32, 16]]",
    "pose": "[[10, 7, 4], 1, Pose, [nc, kpt_shape]]",
    "obb": "[[10, 7, 4], 1, OBB, [nc, 1]]",
    "semantic": "[[10, 7], 1, SemanticSegment, [nc]]",
    "depth": "[[10, 7, 4], 1, Depth, [16]]",
}


def task_yaml(task: str, backbone: str = TINY_BACKBONE) -> str:
    """A tiny model YAML of ``task`` on the tiny RevCol backbone."""
    if task == "classify":
        return tiny_yaml("[4, 1, Classify, [nc]]  # 5", backbone=backbone, neck="")
    return tiny_yaml(HEADS[task], backbone=backbone, extra="kpt_shape: [3, 3]\n" if task == "pose" else "")


def write_yaml(tmp_path: Path, task: str, backbone: str = TINY_BACKBONE, name: str = "tiny") -> str:
    path = tmp_path / f"{name}-revcol-{task}.yaml"
    path.write_text(task_yaml(task, backbone))
    return str(path)


def backbone_with(options: str) -> str:
    """The tiny RevCol backbone row with more options, e.g. ``backbone_with("lr_decay: 0.5")``."""
    return TINY_BACKBONE.replace("drop_path: 0.1}", f"drop_path: 0.1, {options}}}")


def without_revcol(model_yaml: str) -> str:
    """A tiny model YAML with its RevCol row replaced by five plain convolutions, strides 2-32."""
    plain_rows = "\n".join(f"  - [-1, 1, Conv, [{c}, 3, 2]]" for c in (16, 16, 16, 32, 64))
    return model_yaml.replace(f"  - {TINY_BACKBONE}  # 0-4", plain_rows)
