"""An offline demo: a synthetic shapes dataset, and RT-DETR-RevCol trained on it on a CPU.

The dataset (``generate_dataset``)
----------------------------------
Square RGB images (``imgsz`` x ``imgsz`` PNG) with one to ``MAX_SHAPES`` filled shapes each, on a
noisy background. Three classes, told apart by shape only (colours are random for every shape):

    0  circle    a filled disc
    1  square    an axis-aligned filled square
    2  triangle  an upright filled isosceles triangle (apex at the top)

A shape's side (or diameter) is 20-40 % of the image side. Every shape is painted in one flat,
bright, saturated colour (HSV value >= 200); the background is a dull random colour (channels 30-110)
plus Gaussian noise (sigma 14), so the shapes stand out. Shapes never overlap (a gap of ``GAP``
pixels is kept between their boxes), so each label box is exactly the box of the pixels painted for
that shape: a tight box, computed from the drawn mask. The share of a box painted in the shape's
colour tells the class: about 0.79 for a circle, 1 for a square, 0.5 for a triangle.

Layout (Ultralytics/YOLO format)::

    root/
      data.yaml                     path, train/val/test folders, class names
      images/{train,val,test}/000000.png ...
      labels/{train,val,test}/000000.txt ...   one "class cx cy w h" line per shape, normalised to [0, 1]

The split is train/val/test; ``val`` picks the best epoch while training, ``test`` is only used
for the final evaluation and the annotated predictions. The same ``seed`` gives the same files.

The demo (``run_demo``, ``revcol demo``)
----------------------------------------
Generates the dataset (600/60/60 images of 128 px by default), trains the small
``rtdetr-revcol-demo.yaml`` (0.9 M parameters: a 2-column RevCol with channels 16-128, and an
RT-DETR head with 30 queries) on the CPU for 30 epochs (AdamW, lr0 0.005, batch 16, one warm-up
epoch, Ultralytics' default augmentation), evaluates ``best.pt`` on the test split, predicts on the
test images and saves annotated pictures (drawn with OpenCV's built-in font), then prints where
everything is and the test mAP. Nothing is downloaded (see ``offline``). With the defaults it
took about 6 minutes on two shared CPU cores and reached a test mAP50 of about 0.97.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle")
MAX_SHAPES = 3
MIN_SIZE = 0.2  # shape size, as a fraction of the image side
MAX_SIZE = 0.4
GAP = 2  # pixels kept free between shape boxes
SPLITS = ("train", "val", "test")

DEMO_MODEL = "rtdetr-revcol-demo.yaml"
DEMO_DEFAULTS = {
    "epochs": 30,
    "imgsz": 128,
    "n_train": 600,
    "n_val": 60,
    "n_test": 60,
    "batch": 16,
    "lr0": 0.005,
    "seed": 0,
}
BOX_COLOURS = ((0, 255, 255), (255, 255, 0), (255, 0, 255))  # BGR per class: yellow, cyan, magenta
PICTURE_SIZE = 256  # annotated pictures are drawn at this size
GRID = (4, 2)  # columns, rows of the predictions.jpg contact sheet


def _draw_mask(kind: int, x0: int, y0: int, size: int, imgsz: int) -> np.ndarray:
    import cv2

    mask = np.zeros((imgsz, imgsz), np.uint8)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if CLASSES[kind] == "circle":
        radius = (size - 1) / 2
        cv2.circle(mask, (round(x0 + radius), round(y0 + radius)), round(radius), 1, thickness=-1)
    elif CLASSES[kind] == "square":
        mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    else:  # triangle
        apex = (round((x0 + x1) / 2), y0)
        cv2.fillPoly(mask, [np.array([(x0, y1), (x1, y1), apex], np.int32)], 1)
    return mask.astype(bool)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour (HSV value 200-255, saturation >= 0.6) as BGR uint8."""
    import cv2

    hsv = np.array([[[rng.integers(0, 180), rng.integers(153, 256), rng.integers(200, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]


def make_image(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One BGR image and its YOLO labels ``(class, cx, cy, w, h)`` (normalised)."""
    base = rng.integers(30, 110, size=3)
    image = base + rng.normal(0.0, 14.0, size=(imgsz, imgsz, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    boxes: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 inclusive
    labels = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _attempt in range(20):
            size = int(rng.integers(round(MIN_SIZE * imgsz), round(MAX_SIZE * imgsz) + 1))
            x0, y0 = (int(v) for v in rng.integers(0, imgsz - size + 1, size=2))
            if all(
                x0 > bx1 + GAP or x0 + size - 1 < bx0 - GAP or y0 > by1 + GAP or y0 + size - 1 < by0 - GAP
                for bx0, by0, bx1, by1 in boxes
            ):
                break
        else:
            continue  # no free place for this shape
        kind = int(rng.integers(len(CLASSES)))
        mask = _draw_mask(kind, x0, y0, size, imgsz)
        image[mask] = _bright_colour(rng)
        ys, xs = np.nonzero(mask)
        bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        boxes.append((bx0, by0, bx1, by1))
        w, h = bx1 + 1 - bx0, by1 + 1 - by0
        labels.append((kind, (bx0 + w / 2) / imgsz, (by0 + h / 2) / imgsz, w / imgsz, h / imgsz))
    return image, labels


def generate_dataset(
    root: str | Path,
    n_train: int = 600,
    n_val: int = 60,
    imgsz: int = 128,
    seed: int = 0,
    n_test: int | None = None,
) -> Path:
    """Write the synthetic shapes dataset under ``root`` and return the path of its ``data.yaml``.

    ``n_test`` defaults to ``n_val``. Existing files of the same names are overwritten.
    """
    import cv2
    import yaml

    if imgsz < 32:
        raise ValueError(f"imgsz must be >= 32, got {imgsz}")
    counts = dict(zip(SPLITS, (n_train, n_val, n_val if n_test is None else n_test), strict=True))
    if any(n < 1 for n in counts.values()):
        raise ValueError(f"every split needs at least one image, got {counts}")
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, labels = make_image(rng, imgsz)
            stem = f"{index:06d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), image)
            lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
            (root / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(CLASSES)),
    }
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        "# Synthetic shapes (revcol.demo.generate_dataset): "
        f"{counts['train']} train, {counts['val']} val, {counts['test']} test images, {imgsz} px, seed {seed}\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return data_yaml


def _fallback_font() -> Path | None:
    """A TrueType font that is already on disk: the DejaVu Sans shipped inside matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.is_file() else None


@contextlib.contextmanager
def offline():
    """Within this block Ultralytics neither downloads a font nor talks to the network.

    ``YOLO_OFFLINE=true`` in the environment before Ultralytics is imported stops most network use,
    but not all of it, and is read only once, at import. Here, whatever was set:

    * ``check_font`` (which fetches ``Arial.ttf`` into Ultralytics' settings folder the first time a
      dataset is checked or a label is drawn with PIL, whatever ``YOLO_OFFLINE`` says) still uses a
      font already in that folder and otherwise answers matplotlib's DejaVu Sans, without downloading;
    * the PyPI update check and the usage analytics see Ultralytics as offline.
    """
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import checks, plotting
    from ultralytics.utils import events as events_module

    original = checks.check_font

    @functools.wraps(original)
    def check_font(font: str = "Arial.ttf"):
        if Path(font).is_file() or (checks.USER_CONFIG_DIR / Path(font).name).is_file():  # where it looks first
            return original(font)
        return _fallback_font()

    with contextlib.ExitStack() as stack:
        for owner in (checks, data_utils, plotting):
            if getattr(owner, "check_font", None) is original:
                stack.enter_context(replaced(owner, "check_font", check_font))
        stack.enter_context(replaced(checks, "ONLINE", False))
        stack.enter_context(replaced(events_module.events, "enabled", False))
        yield


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """Context manager: ``owner.name`` is ``value`` inside, its old value again after."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def draw_predictions(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """A copy of BGR ``image`` scaled to ``PICTURE_SIZE`` with labelled boxes (xyxy in ``image`` pixels).

    Drawn with OpenCV's built-in Hershey font, so no font file is needed.
    """
    import cv2

    scale = PICTURE_SIZE / max(image.shape[:2])
    picture = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    font, font_scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    for (x0, y0, x1, y1), c, score in zip(boxes * scale, classes.astype(int), scores, strict=True):
        colour = BOX_COLOURS[c % len(BOX_COLOURS)]
        p0, p1 = (round(x0), round(y0)), (round(x1), round(y1))
        cv2.rectangle(picture, p0, p1, colour, 2, cv2.LINE_AA)
        text = f"{CLASSES[c] if c < len(CLASSES) else c} {score:.2f}"
        (w, h), base = cv2.getTextSize(text, font, font_scale, thickness)
        ty = p0[1] - 3 if p0[1] - h - base - 3 >= 0 else p0[1] + h + 3  # above the box, or inside at the top
        cv2.rectangle(picture, (p0[0] - 1, ty - h - 2), (p0[0] + w + 2, ty + base - 1), colour, -1)
        cv2.putText(picture, text, (p0[0] + 1, ty - 1), font, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return picture


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
    seconds: dict[str, float] = field(default_factory=dict)


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
    Sets ``YOLO_OFFLINE=true`` for this process; nothing is downloaded.
    """
    import json

    import cv2
    from torchvision.ops import nms

    os.environ["YOLO_OFFLINE"] = "true"
    from ultralytics import RTDETR
    from ultralytics.utils import LOGGER

    import revcol  # noqa: F401  (registers the backbones)

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)

    LOGGER.info(f"revcol demo: generating {n_train}/{n_val}/{n_test} train/val/test images of {imgsz} px ...")
    data_yaml = generate_dataset(output / "dataset", n_train, n_val, imgsz, seed, n_test=n_test)
    seconds["dataset"] = time.perf_counter() - start

    common = {"imgsz": imgsz, "batch": batch, "device": device, "workers": workers, "plots": False}
    with offline():
        tic = time.perf_counter()
        detector = RTDETR(model)
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
            **common,
        )
        train_dir = Path(detector.trainer.save_dir)
        best = train_dir / "weights" / "best.pt"
        if not best.is_file():
            best = train_dir / "weights" / "last.pt"
        seconds["train"] = time.perf_counter() - tic

        tic = time.perf_counter()
        trained = RTDETR(str(best))
        metrics = trained.val(
            data=str(data_yaml),
            split="test",
            project=str(output),
            name="test",
            exist_ok=True,
            **{**common, "plots": True},  # PR curves and confusion matrix of the test split
        )
        test_dir = Path(metrics.save_dir)
        seconds["test"] = time.perf_counter() - tic

        tic = time.perf_counter()
        predictions_dir = output / "predictions"
        predictions_dir.mkdir(exist_ok=True)
        pictures = []
        results = trained.predict(
            source=str(output / "dataset" / "images" / "test"),
            imgsz=imgsz,
            device=device,
            conf=0.5,
            stream=True,
            verbose=False,
        )
        for result in results:
            boxes = result.boxes.cpu()
            keep = nms(boxes.xyxy, boxes.conf, iou_threshold=0.7).numpy()  # one label per object in the pictures
            picture = draw_predictions(
                result.orig_img, boxes.xyxy.numpy()[keep], boxes.cls.numpy()[keep], boxes.conf.numpy()[keep]
            )
            cv2.imwrite(str(predictions_dir / f"{Path(result.path).stem}.jpg"), picture)
            pictures.append(picture)
        grid = output / "predictions.jpg"
        columns, rows = GRID
        rows = min(rows, math.ceil(len(pictures) / columns))
        cv2.imwrite(str(grid), contact_sheet(pictures, columns, rows), [cv2.IMWRITE_JPEG_QUALITY, 85])
        seconds["predict"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start

    result = DemoResult(
        output=output,
        data_yaml=data_yaml,
        train_dir=train_dir,
        best=best,
        test_dir=test_dir,
        predictions_dir=predictions_dir,
        predictions_grid=grid,
        summary=output / "summary.json",
        map50=float(metrics.box.map50),
        map50_95=float(metrics.box.map),
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
    summary.update(model=model, epochs=epochs, imgsz=imgsz, images={"train": n_train, "val": n_val, "test": n_test})
    result.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(result, n_test=len(pictures)))
    return result


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
            f"revcol demo finished in {minutes}m{secs:02d}s",
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
