"""The offline demo (``run_demo``, ``revcol demo``): RT-DETR-RevCol trained on generated shapes, on a CPU.

Generates the shapes dataset (``revcol.demo.shapes``; 480/40/40 images of 96 px by default), trains the small
``rtdetr-revcol-demo.yaml`` (0.9 M parameters: a 2-column RevCol with channels 16-128, and an RT-DETR head with 30
queries) on the CPU for 15 epochs (AdamW, lr0 0.005, batch 16, 10 denoising queries, one warm-up epoch,
Ultralytics' default augmentation) with every core the process is given, evaluates ``best.pt`` on the test split,
predicts on the test images and saves pictures annotated by Ultralytics' ``Results.plot``, then prints where
everything is, its wall time, the thread count and the test mAP. Nothing is downloaded (see ``offline``). Measured
times and accuracy are in ``docs/demo.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from revcol._process import process_state_kept
from revcol.demo.shapes import generate_dataset

if TYPE_CHECKING:
    from torch import nn
    from ultralytics.engine.results import Results
    from ultralytics.utils.metrics import DetMetrics


DEMO_MODEL = "rtdetr-revcol-demo.yaml"
DEMO_DEFAULTS = {
    "epochs": 15,
    "imgsz": 96,
    "n_train": 480,
    "n_val": 40,
    "n_test": 40,
    "batch": 16,
    "lr0": 0.005,
    "denoising": 10,
    "seed": 0,
}
MIN_CONF = 0.5  # detections drawn in the annotated pictures
OVERLAP_IOU = 0.7  # of boxes overlapping more than this, only the most confident is drawn
PICTURE_SIZE = 256  # annotated pictures are drawn at this size
GRID = (4, 2)  # columns, rows of the predictions.jpg contact sheet


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within this block Ultralytics neither downloads a font nor talks to the network.

    ``YOLO_OFFLINE=true`` in the environment before Ultralytics is imported stops most network use,
    but not all of it, and is read only once, at import. Here, whatever was set:

    * ``check_font`` (which fetches ``Arial.ttf`` into Ultralytics' settings folder the first time a
      dataset is checked or a label is drawn with PIL, whatever ``YOLO_OFFLINE`` says) still uses a
      font already in that folder and otherwise answers matplotlib's DejaVu Sans, without downloading;
    * the PyPI update check and the usage analytics see Ultralytics as offline.

    The attributes replaced are the ``offline`` group of ``revcol.ultralytics.hooks.HOOKS``.
    """
    from revcol.ultralytics import hooks

    with hooks.applied(hooks.OFFLINE):
        yield


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under ``taskset``), where the OS tells."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def training_threads(device: str, workers: int) -> int | None:
    """Torch threads for training on the CPU with no loader workers: every core the process is given.

    Ultralytics sets ``cpu_count - 1`` torch threads, leaving a core to its data-loading workers; with ``workers=0``
    the main process loads the data itself between steps, so that core would sit idle (a 2-core machine would
    train on one). None (keep Ultralytics' setting) on a GPU or with loader workers.
    """
    return available_cores() if str(device).lower() == "cpu" and workers == 0 else None


@contextlib.contextmanager
def denoising_queries(model: nn.Module, queries: int) -> Iterator[None]:
    """``model``'s RT-DETR decoders train with ``queries`` contrastive denoising queries inside the block (Ultralytics'
    default: 100); their own count is back after it.

    Denoising queries exist only in training (noised copies of the ground-truth boxes that the decoder learns to
    restore), so the model and its inference are the same; fewer of them make a CPU training step about twice as
    fast on the demo's images, which hold at most three objects. Set on the built model because a YAML can name
    the count only after the decoder's activation, which Ultralytics before 8.4.146 cannot take from a YAML; the
    attribute is the ``denoising`` group of ``revcol.ultralytics.hooks.HOOKS``.
    """
    from revcol.ultralytics import hooks

    decoders = _decoders(model)
    if queries < 0:
        raise ValueError(f"the number of denoising queries must be >= 0, got {queries}")
    with contextlib.ExitStack() as stack:
        for decoder in decoders:
            stack.enter_context(hooks.applied(hooks.DENOISING, instance=decoder, value=queries))
        yield


def _decoders(model: nn.Module) -> list[nn.Module]:
    from ultralytics.nn.modules.head import RTDETRDecoder

    decoders = [m for m in model.modules() if isinstance(m, RTDETRDecoder)]
    if not decoders:
        raise ValueError("denoising queries need an RT-DETR model (an RTDETRDecoder head)")
    return decoders


def train(
    model: str,
    data_yaml: Path,
    output: Path,
    *,
    epochs: int,
    lr0: float,
    seed: int,
    denoising: int | None = None,
    **settings,
) -> tuple[Path, int]:
    """Train ``model`` on ``data_yaml`` into ``output/train``.

    Returns its ``best.pt`` (``last.pt`` if there is none) and the number of torch threads it trained with.
    ``denoising``: the decoder's denoising queries in training (None: the model's own). ``settings`` (imgsz,
    batch, device, workers) go to Ultralytics' ``train`` as they are.
    """
    import torch
    from ultralytics import RTDETR

    threads = training_threads(settings.get("device", "cpu"), settings.get("workers", 0))
    used: list[int] = []
    with contextlib.ExitStack() as borrowed:  # the thread count and the model's denoising queries, given back after
        borrowed.callback(torch.set_num_threads, torch.get_num_threads())

        def before_training(trainer) -> None:
            # After the trainer's select_device (which sets Ultralytics' thread count), before the first batch.
            if threads is not None:
                torch.set_num_threads(threads)
            used.append(torch.get_num_threads())
            if denoising is not None:
                borrowed.enter_context(denoising_queries(trainer.model, denoising))

        detector = RTDETR(model)
        detector.add_callback("on_train_start", before_training)
        detector.train(
            data=str(data_yaml),
            epochs=epochs,
            optimizer="AdamW",
            lr0=lr0,
            warmup_epochs=min(1.0, epochs / 10),
            seed=seed,
            project=str(output),
            name="train",
            exist_ok=True,
            plots=False,
            **settings,
        )
    weights = Path(detector.trainer.save_dir) / "weights"
    best = weights / "best.pt"
    return (best if best.is_file() else weights / "last.pt"), used[0]


def evaluate(weights: Path, data_yaml: Path, output: Path, **settings) -> DetMetrics:
    """The metrics of ``weights`` on the test split; its plots (PR curves, confusion matrix) go to ``output/test``."""
    from ultralytics import RTDETR

    return RTDETR(str(weights)).val(
        data=str(data_yaml), split="test", project=str(output), name="test", exist_ok=True, plots=True, **settings
    )


def annotate(result: Results) -> np.ndarray:
    """``result`` drawn by ``Results.plot`` on its image scaled to ``PICTURE_SIZE``.

    Of boxes overlapping with IoU > ``OVERLAP_IOU`` only the most confident is drawn: RT-DETR does no NMS.
    """
    import cv2
    from torchvision.ops import nms
    from ultralytics.engine.results import Results

    boxes = result.boxes.cpu()
    kept = boxes.data[nms(boxes.xyxy, boxes.conf, OVERLAP_IOU)]
    scale = PICTURE_SIZE / max(result.orig_shape)
    kept[:, :4] *= scale
    # Scaling the image before plotting keeps the lines and labels sharp; plotting sizes them to the picture.
    image = cv2.resize(result.orig_img, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    # pil=False (the class names are ASCII): OpenCV's built-in font, so check_font never fetches Arial.ttf.
    return Results(image, result.path, result.names, boxes=kept).plot(pil=False)


def save_predictions(weights: Path, images: Path, predictions_dir: Path, sheet: Path, imgsz: int, device: str) -> int:
    """Predict on every image in ``images``; save each annotated as ``predictions_dir/<stem>.jpg``.

    The first ``GRID`` pictures also go, as a contact sheet, to ``sheet``. Returns the number of pictures.
    """
    import cv2
    from ultralytics import RTDETR

    predictions_dir.mkdir(parents=True, exist_ok=True)
    results = RTDETR(str(weights)).predict(
        source=str(images), imgsz=imgsz, device=device, conf=MIN_CONF, stream=True, verbose=False
    )
    pictures = []
    for result in results:
        picture = annotate(result)
        cv2.imwrite(str(predictions_dir / f"{Path(result.path).stem}.jpg"), picture)
        pictures.append(picture)
    columns, rows = GRID
    rows = min(rows, math.ceil(len(pictures) / columns))
    cv2.imwrite(str(sheet), contact_sheet(pictures, columns, rows), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return len(pictures)


def contact_sheet(pictures: list[np.ndarray], columns: int, rows: int, gap: int = 4) -> np.ndarray:
    """Up to ``columns * rows`` equal-sized pictures in a grid with white gaps."""
    h, w = pictures[0].shape[:2]
    sheet = np.full((rows * h + (rows + 1) * gap, columns * w + (columns + 1) * gap, 3), 255, np.uint8)
    for i, picture in enumerate(pictures[: columns * rows]):
        r, c = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y : y + h, x : x + w] = picture
    return sheet


@dataclass
class DemoResult:
    """What ``run_demo`` produced: paths, metrics on the test split and timings (seconds)."""

    output: Path
    data_yaml: Path
    train_dir: Path
    best: Path
    test_dir: Path
    predictions_dir: Path
    predictions_grid: Path
    summary: Path
    map50: float
    map50_95: float
    threads: int  # torch threads during training
    seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str):
    """Store the duration of the block in ``seconds[step]``."""
    tic = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - tic


def run_demo(
    output: str | Path = "revcol-demo",
    epochs: int = DEMO_DEFAULTS["epochs"],
    imgsz: int = DEMO_DEFAULTS["imgsz"],
    device: str = "cpu",
    batch: int = DEMO_DEFAULTS["batch"],
    n_train: int = DEMO_DEFAULTS["n_train"],
    n_val: int = DEMO_DEFAULTS["n_val"],
    n_test: int = DEMO_DEFAULTS["n_test"],
    lr0: float = DEMO_DEFAULTS["lr0"],
    denoising: int = DEMO_DEFAULTS["denoising"],
    seed: int = DEMO_DEFAULTS["seed"],
    workers: int = 0,
    model: str = DEMO_MODEL,
) -> DemoResult:
    """Generate the shapes dataset, train ``model``, evaluate on the test split, save annotated predictions.

    Everything goes under ``output``: ``dataset/``, ``train/`` (the Ultralytics run: weights, results.csv),
    ``test/`` (evaluation of best.pt on the test split: PR curves, confusion matrix, labelled and predicted
    batches), ``predictions/`` (one annotated picture per test image: detections with confidence >= 0.5,
    overlapping ones (IoU > 0.7) reduced to the most confident, as RT-DETR does no NMS), ``predictions.jpg``
    (a contact sheet of the first ones) and ``summary.json`` (paths, mAP, timings).
    Runs with ``YOLO_OFFLINE=true``; nothing is downloaded, and the process's environment and loggers are left
    as they were.
    """
    images = {"train": n_train, "val": n_val, "test": n_test}
    settings = {"imgsz": imgsz, "batch": batch, "device": device, "workers": workers}
    # Ultralytics reads YOLO_OFFLINE at every network check; training sets variables of its own, given back too.
    with process_state_kept(YOLO_OFFLINE="true"):
        result, n_pictures = _run(
            Path(output).resolve(), model, images, epochs=epochs, lr0=lr0, seed=seed, denoising=denoising, **settings
        )
    write_summary(result, model=model, epochs=epochs, imgsz=imgsz, images=images, denoising=denoising)
    print(format_summary(result, n_test=n_pictures))
    return result


def _run(
    output: Path, model: str, images: dict[str, int], *, epochs: int, lr0: float, seed: int, denoising: int, **settings
) -> tuple[DemoResult, int]:
    """The demo's steps, timed; returns its result and the number of annotated test pictures."""
    from ultralytics.utils import LOGGER

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    dataset, predictions_dir, grid = output / "dataset", output / "predictions", output / "predictions.jpg"
    imgsz = settings["imgsz"]
    counts = f"{images['train']}/{images['val']}/{images['test']}"
    LOGGER.info(f"revcol demo: generating {counts} train/val/test images of {imgsz} px ...")
    with _timed(seconds, "dataset"):
        data_yaml = generate_dataset(dataset, images["train"], images["val"], imgsz, seed, n_test=images["test"])
    with offline():
        with _timed(seconds, "train"):
            best, threads = train(
                model, data_yaml, output, epochs=epochs, lr0=lr0, seed=seed, denoising=denoising, **settings
            )
        with _timed(seconds, "test"):
            metrics = evaluate(best, data_yaml, output, **settings)
        with _timed(seconds, "predict"):
            test_images = dataset / "images" / "test"
            n_pictures = save_predictions(best, test_images, predictions_dir, grid, imgsz, settings["device"])
    seconds["total"] = time.perf_counter() - start
    result = DemoResult(
        output=output,
        data_yaml=data_yaml,
        train_dir=best.parents[1],
        best=best,
        test_dir=Path(metrics.save_dir),
        predictions_dir=predictions_dir,
        predictions_grid=grid,
        summary=output / "summary.json",
        map50=float(metrics.box.map50),
        map50_95=float(metrics.box.map),
        threads=threads,
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )
    return result, n_pictures


def write_summary(result: DemoResult, **settings) -> None:
    """Write ``result`` (paths as strings) and the run's ``settings`` as JSON to ``result.summary``."""
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
    summary.update(settings)
    result.summary.write_text(json.dumps(summary, indent=2) + "\n")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_summary(result: DemoResult, n_test: int) -> str:
    """The closing report of the demo: where everything is, and the test mAP."""
    minutes, secs = divmod(round(result.seconds.get("total", 0.0)), 60)
    cwd = Path.cwd()

    def show(path: Path) -> str:
        try:
            return str(path.relative_to(cwd))
        except ValueError:
            return str(path)

    return "\n".join(
        [
            "",
            f"revcol demo finished in {minutes}m{secs:02d}s (trained with {plural(result.threads, 'torch thread')}, "
            f"{plural(available_cores(), 'CPU core')} available)",
            f"  dataset       {show(result.data_yaml)}",
            f"  training run  {show(result.train_dir)}  (results.csv, weights/best.pt, weights/last.pt)",
            f"  best weights  {show(result.best)}",
            f"  test metrics  {show(result.test_dir)}  (PR curves, confusion matrix)",
            f"  predictions   {show(result.predictions_dir)}/  ({n_test} annotated test images)",
            f"  overview      {show(result.predictions_grid)}",
            f"  summary       {show(result.summary)}",
            f"  test mAP50 {result.map50:.3f}   mAP50-95 {result.map50_95:.3f}",
            "",
            "Try it on your own images:",
            f"  revcol predict model={show(result.best)} source=path/to/images",
        ]
    )
