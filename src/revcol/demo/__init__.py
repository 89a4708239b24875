"""``revcol demo``: a dataset of generated shapes (``shapes``), the torch threads it trains with (``threads``), a
short RT-DETR RevCol run on it (``run``) and its annotated predictions (``pictures``)."""

from revcol.demo.pictures import annotate
from revcol.demo.run import DEMO_DEFAULTS, DemoResult, offline, run_demo, training_threads
from revcol.demo.shapes import CLASSES, MAX_SHAPES, generate_dataset
from revcol.demo.threads import IdleCores, available_cores, threads_for

__all__ = [
    "CLASSES",
    "DEMO_DEFAULTS",
    "MAX_SHAPES",
    "DemoResult",
    "IdleCores",
    "annotate",
    "available_cores",
    "generate_dataset",
    "offline",
    "run_demo",
    "threads_for",
    "training_threads",
]
