"""Checkpoint files: reading them without running code (``files``), and a backbone's state in and out
(``backbone``)."""

from revcol.checkpoints.backbone import HeadRule, LoadResult, load_pretrained, read_backbone, save_backbone
from revcol.checkpoints.files import read_checkpoint

__all__ = ["HeadRule", "LoadResult", "load_pretrained", "read_backbone", "read_checkpoint", "save_backbone"]
