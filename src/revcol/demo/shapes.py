"""The synthetic shapes dataset of the offline demo (``generate_dataset``).

Square RGB images (``imgsz`` x ``imgsz`` PNG) with one to ``MAX_SHAPES`` filled shapes each, on a
noisy background. Three classes, told apart by shape only: a shape's colour, size and place are drawn
from the same distributions whatever its class (``tests/test_demo.py`` checks that colours and box
widths do not tell the classes apart):

    0  circle    a filled disc
    1  square    an axis-aligned filled square
    2  triangle  an upright filled isosceles triangle (apex at the top)

A shape's side (or diameter) is 20-40 % of the image side, and so is its box's width and height
(a circle's pixels are those whose centres lie in the disc). Every shape is painted in one flat,
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
for the final evaluation and the annotated predictions. The same ``seed`` gives the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle")


MAX_SHAPES = 5  # shapes tried per image (fewer where no free place is left); more objects teach more per step


MIN_SIZE = 0.2  # shape size, as a fraction of the image side


MAX_SIZE = 0.4


GAP = 2  # pixels kept free between shape boxes


SPLITS = ("train", "val", "test")


def _draw_mask(kind: int, x0: int, y0: int, size: int, imgsz: int) -> np.ndarray:
    import cv2

    mask = np.zeros((imgsz, imgsz), np.uint8)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if CLASSES[kind] == "circle":
        # The pixels whose centres lie in the disc of diameter `size` centred on the box: its box is `size` wide, as
        # a square's and a triangle's are (cv2.circle's whole-pixel radius would make every circle's width odd).
        ys, xs = np.ogrid[:imgsz, :imgsz]
        mask[(xs - (x0 + x1) / 2) ** 2 + (ys - (y0 + y1) / 2) ** 2 <= (size / 2) ** 2] = 1
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
