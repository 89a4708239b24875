"""The offline demo (``run_demo``, ``revcol demo``): RT-DETR-RevCol trained on generated shapes, on a CPU.

Generates the shapes dataset (``revcol.demo.shapes``; 480/40/40 images of 96 px by default), trains the small
``rtdetr-revcol-demo.yaml`` (0.9 M parameters: a 2-column RevCol with channels 16-128, and an RT-DETR head with 30
queries) on the CPU for 15 epochs (AdamW, lr0 0.005, batch 8 with an optimizer step every batch, 10 denoising
queries, one warm-up epoch, Ultralytics' default augmentation) with as many torch threads as there are free cores
(``revcol.demo.threads``), evaluates ``best.pt`` on the test split, predicts on the test images and saves pictures
annotated by Ultralytics' ``Results.plot``, then prints where everything is, its wall time, the thread count and the
test mAP. Nothing is downloaded (see ``offline``). Measured times and accuracy are in ``docs/demo.md``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from revcol._process import process_state_kept
from revcol.demo.pictures import save_predictions
from revcol.demo.shapes import generate_dataset
from revcol.demo.threads import IdleCores, available_cores, metered_threads

if TYPE_CHECKING:
    from torch import nn
    from ultralytics.utils.metrics import DetMetrics


DEMO_MODEL = "rtdetr-revcol-demo.yaml"
DEMO_DEFAULTS = {
    "epochs": 15,
    "imgsz": 96,
    "n_train": 480,
    "n_val": 40,
    "n_test": 40,
    "batch": 8,
    "lr0": 0.005,
    "denoising": 10,
    "seed": 0,
}


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


def thread_meter(device: str, workers: int) -> IdleCores | None:
    """What sets the torch threads for training on the CPU with no loader workers: the cores other processes leave
    free (``revcol.demo.threads``), read at every epoch's start.

    Ultralytics sets ``cpu_count - 1`` torch threads, leaving a core to its data-loading workers; with ``workers=0``
    the main process loads the data itself between steps, so that core would sit idle on a quiet machine, and on a
    busy one any thread beyond the free cores slows every step. None (keep Ultralytics' setting) on a GPU or with
    loader workers.
    """
    return IdleCores() if str(device).lower() == "cpu" and workers == 0 else None


def training_threads(device: str, workers: int) -> int | None:
    """The torch threads the demo would train with now: the cores other processes leave free, read over
    ``revcol.demo.threads.MIN_INTERVAL``; None (Ultralytics' setting) on a GPU or with loader workers."""
    meter = thread_meter(device, workers)
    return None if meter is None else meter.threads()


@contextlib.contextmanager
def denoising_queries(model: nn.Module, queries: int) -> Iterator[None]:
    """``model``'s RT-DETR decoders train with ``queries`` contrastive denoising queries inside the block (Ultralytics'
    default: 100); their own count is back after it.

    Denoising queries exist only in training (noised copies of the ground-truth boxes that the decoder learns to
    restore), so the model and its inference are the same; fewer of them make a CPU training step about twice as
    fast on the demo's images, which hold at most five objects. Set on the built model because a YAML can name
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
    batch: int,
    lr0: float,
    seed: int,
    denoising: int | None = None,
    meter: IdleCores | None = None,
    **settings,
) -> tuple[Path, list[int]]:
    """Train ``model`` on ``data_yaml`` into ``output/train``.

    Returns its ``best.pt`` (``last.pt`` if there is none) and the number of torch threads of every epoch.
    ``denoising``: the decoder's denoising queries in training (None: the model's own). ``meter``: sets the
    threads at every epoch's start (None: Ultralytics' setting). ``settings`` (imgsz, device, workers) go to
    Ultralytics' ``train`` as they are.
    """
    from ultralytics import RTDETR

    used: list[int] = []
    detector = RTDETR(model)
    with contextlib.ExitStack() as borrowed:  # the thread count and the model's denoising queries, given back after
        borrowed.enter_context(metered_threads(meter, detector, "on_train_epoch_start", used))

        def before_training(trainer) -> None:
            if denoising is not None:
                borrowed.enter_context(denoising_queries(trainer.model, denoising))

        detector.add_callback("on_train_start", before_training)
        detector.train(
            data=str(data_yaml),
            epochs=epochs,
            batch=batch,
            optimizer="AdamW",
            lr0=lr0,
            # Every batch is an optimizer step: Ultralytics' nominal batch of 64 would sum the gradients of 8 batches
            # of 8 into one step, leaving a short run an eighth of the updates (15 epochs: 113 rather than 900).
            nbs=batch,
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
    return (best if best.is_file() else weights / "last.pt"), used


def evaluate(weights: Path, data_yaml: Path, output: Path, meter: IdleCores | None = None, **settings) -> DetMetrics:
    """The metrics of ``weights`` on the test split; its plots (PR curves, confusion matrix) go to ``output/test``.

    ``meter``: sets the torch threads (None: Ultralytics' setting)."""
    from ultralytics import RTDETR

    detector = RTDETR(str(weights))
    with metered_threads(meter, detector, "on_val_start"):
        return detector.val(
            data=str(data_yaml), split="test", project=str(output), name="test", exist_ok=True, plots=True, **settings
        )


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
    threads: list[int]  # torch threads of every training epoch
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
    batches), ``predictions/`` (one annotated picture per test image: detections with confidence >= ``MIN_CONF``,
    overlapping ones (IoU > ``OVERLAP_IOU``) reduced to the most confident, as RT-DETR does no NMS), ``predictions.jpg``
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
    meter = thread_meter(settings["device"], settings["workers"])  # its first reading spans the dataset's making
    with _timed(seconds, "dataset"):
        data_yaml = generate_dataset(dataset, images["train"], images["val"], imgsz, seed, n_test=images["test"])
    with offline():
        with _timed(seconds, "train"):
            best, threads = train(
                model,
                data_yaml,
                output,
                epochs=epochs,
                lr0=lr0,
                seed=seed,
                denoising=denoising,
                meter=meter,
                **settings,
            )
        with _timed(seconds, "test"):
            metrics = evaluate(best, data_yaml, output, meter, **settings)
        with _timed(seconds, "predict"):
            test_images = dataset / "images" / "test"
            n_pictures = save_predictions(best, test_images, predictions_dir, grid, imgsz, settings["device"], meter)
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
    """``count`` and ``noun``, with an s unless there is one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def thread_counts(threads: list[int]) -> str:
    """The torch threads of the epochs, as one count or a range: "1 torch thread", "1-2 torch threads"."""
    low, high = min(threads), max(threads)
    return plural(low, "torch thread") if low == high else f"{low}-{high} torch threads"


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
            f"revcol demo finished in {minutes}m{secs:02d}s (trained with {thread_counts(result.threads)}, "
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
