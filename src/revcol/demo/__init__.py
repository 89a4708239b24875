"""``revcol demo``: a dataset of generated shapes (``shapes``) and a short RT-DETR RevCol run on it (``run``)."""

from revcol.demo.run import DEMO_DEFAULTS, DemoResult, annotate, available_cores, offline, run_demo, training_threads
from revcol.demo.shapes import CLASSES, MAX_SHAPES, generate_dataset

__all__ = [
    "CLASSES",
    "DEMO_DEFAULTS",
    "MAX_SHAPES",
    "DemoResult",
    "annotate",
    "available_cores",
    "generate_dataset",
    "offline",
    "run_demo",
    "training_threads",
]
