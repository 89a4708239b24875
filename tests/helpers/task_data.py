"""Small synthetic datasets in Ultralytics' formats for the segment, pose, OBB, classify, semantic and depth tasks.

Every image is ``imgsz`` px square: a dull noisy background with bright flat shapes, at most one in each cell
of a 2 x 2 grid, so shapes never overlap and every label is exactly the geometry that was drawn. Detection-style
layouts (segment, pose, OBB)::

    root/data.yaml                       path, train/val folders, names (+ kpt_shape, flip_idx for pose)
    root/images/{train,val}/000000.png
    root/labels/{train,val}/000000.txt   one line per shape, coordinates normalised to [0, 1]

Classification is an ImageFolder tree ``root/{train,val}/<class>/000000.png``; ``data=`` is ``root``.
Semantic segmentation (Ultralytics' ``SemanticDataset``) and depth (``DepthDataset``) pair each image with a map
in a folder beside ``images``, same split and stem::

    root/masks/{train,val}/000000.png    uint8, each pixel its class id (0 background), masks_dir: masks
    root/depth/{train,val}/000000.npy    float32 metres, (imgsz, imgsz): a far wall with nearer flat shapes
The same ``seed`` gives the same files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import yaml

GRID = 2  # cells per side; one shape at most per cell
SPLITS = ("train", "val")

SEGMENT_NAMES = ("disc", "triangle")  # polygons of 24 and 3 vertices
POSE_NAMES = ("triangle",)
POSE_KEYPOINTS = ("apex", "left", "right")
POSE_FLIP_IDX = [0, 2, 1]  # a horizontal flip swaps the left and right corners
OBB_NAMES = ("bar", "square")  # rotated rectangles of aspect 3:1 and 1:1
CLASSIFY_NAMES = ("disc", "triangle")
SEMANTIC_NAMES = ("background", "disc", "triangle")  # mask pixel values 0, 1, 2
DEPTH_BACKGROUND = 6.0  # metres: the wall behind the shapes; each shape is a flat plate at 1-4 m

Cell = tuple[float, float, float]  # centre x, centre y, half-size (px) of the square a shape must stay inside
Shape = Callable[[np.random.Generator, np.ndarray, Cell], list[float]]  # draws one shape, returns its label row


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    image = rng.integers(30, 110, size=3) + rng.normal(0.0, 14.0, size=(imgsz, imgsz, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A bright BGR colour: one channel at full strength, so every shape stands out from the dull background."""
    colour = rng.integers(0, 256, size=3)
    colour[rng.integers(3)] = 255
    return tuple(int(c) for c in colour)


def _cells(rng: np.random.Generator, imgsz: int, count: int) -> list[Cell]:
    """``count`` distinct grid cells, each with a 2 px margin so no shape touches a neighbour or the border."""
    side = imgsz / GRID
    chosen = rng.choice(GRID * GRID, size=count, replace=False)
    return [((i % GRID + 0.5) * side, (i // GRID + 0.5) * side, side / 2 - 2) for i in chosen]


def _fill(image: np.ndarray, points: np.ndarray, colour: tuple[int, int, int]) -> None:
    cv2.fillPoly(image, [np.round(points).astype(np.int32)], colour)


def regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> np.ndarray:
    """Vertices ``(sides, 2)`` of a regular polygon, in pixels, the first one at ``angle`` radians."""
    t = angle + 2 * np.pi * np.arange(sides) / sides
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def rotated_rectangle(cx: float, cy: float, width: float, height: float, angle: float) -> np.ndarray:
    """Corners ``(4, 2)`` of a ``width`` x ``height`` rectangle turned by ``angle`` radians, in drawing order."""
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [width / 2, height / 2]
    c, s = np.cos(angle), np.sin(angle)
    return corners @ np.array([[c, s], [-s, c]]) + [cx, cy]


def _box(points: np.ndarray) -> list[float]:
    """``cx, cy, w, h`` (px) of the axis-aligned box around ``points``."""
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def _segment_shape(rng: np.random.Generator, image: np.ndarray, cell: Cell) -> list[float]:
    cls = int(rng.integers(len(SEGMENT_NAMES)))
    cx, cy, half = cell
    polygon = regular_polygon(cx, cy, half * rng.uniform(0.6, 1.0), (24, 3)[cls], rng.uniform(0, 2 * np.pi))
    _fill(image, polygon, _colour(rng))
    return [cls, *(polygon / image.shape[0]).ravel()]


def _pose_shape(rng: np.random.Generator, image: np.ndarray, cell: Cell) -> list[float]:
    """An upright triangle; its keypoints are its apex, left and right corners, all visible (2)."""
    cx, cy, half = cell
    w, h = half * rng.uniform(1.2, 2.0, size=2)
    top, bottom = cy - h / 2, cy + h / 2
    corners = np.array([[cx + rng.uniform(-0.3, 0.3) * w, top], [cx - w / 2, bottom], [cx + w / 2, bottom]])
    _fill(image, corners, _colour(rng))
    keypoints = np.concatenate([corners / image.shape[0], np.full((3, 1), 2.0)], axis=1)
    return [0, *(np.array(_box(corners)) / image.shape[0]), *keypoints.ravel()]


def _obb_shape(rng: np.random.Generator, image: np.ndarray, cell: Cell) -> list[float]:
    cls = int(rng.integers(len(OBB_NAMES)))
    cx, cy, half = cell
    unit = rotated_rectangle(0.0, 0.0, 1.0, (1 / 3, 1.0)[cls], rng.uniform(0, np.pi))
    corners = unit * (half * rng.uniform(0.7, 1.0) / np.abs(unit).max()) + [cx, cy]  # as large as the cell allows
    _fill(image, corners, _colour(rng))
    return [cls, *(corners / image.shape[0]).ravel()]


def _images(rng: np.random.Generator, n: int, imgsz: int, shape: Shape) -> Iterator[tuple[np.ndarray, list]]:
    for _ in range(n):
        image = _background(rng, imgsz)
        rows = [shape(rng, image, cell) for cell in _cells(rng, imgsz, int(rng.integers(1, GRID * GRID + 1)))]
        yield image, rows


def _write_detection_layout(
    root: Path, shape: Shape, names: tuple[str, ...], n_train: int, n_val: int, imgsz: int, seed: int, **extra
) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (image, rows) in enumerate(_images(rng, n, imgsz, shape)):
            cv2.imwrite(str(root / "images" / split / f"{i:06d}.png"), image)
            lines = [" ".join([str(int(row[0])), *(f"{v:.6f}" for v in row[1:])]) for row in rows]
            (root / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(names)), **extra}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def segment_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Discs and triangles with polygon labels ``class x1 y1 ... xn yn``; returns ``data.yaml``."""
    return _write_detection_layout(Path(root), _segment_shape, SEGMENT_NAMES, n_train, n_val, imgsz, seed)


def pose_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Triangles with 3 keypoints, ``class cx cy w h (kx ky v) x 3``; returns ``data.yaml`` (``kpt_shape: [3, 3]``)."""
    return _write_detection_layout(
        Path(root), _pose_shape, POSE_NAMES, n_train, n_val, imgsz, seed,
        kpt_shape=[len(POSE_KEYPOINTS), 3], flip_idx=POSE_FLIP_IDX, kpt_names={0: list(POSE_KEYPOINTS)},
    )  # fmt: skip


def obb_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Rotated bars and squares labelled by their corners ``class x1 y1 x2 y2 x3 y3 x4 y4``; returns ``data.yaml``."""
    return _write_detection_layout(Path(root), _obb_shape, OBB_NAMES, n_train, n_val, imgsz, seed)


def classify_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """One disc or triangle per image in ``root/{train,val}/<class>/``, classes taking turns; returns ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    whole = (imgsz / 2, imgsz / 2, imgsz / 2 - 2)
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        for i in range(n):
            cls = i % len(CLASSIFY_NAMES)
            image = _background(rng, imgsz)
            polygon = regular_polygon(*whole[:2], whole[2] * rng.uniform(0.5, 1.0), (24, 3)[cls], rng.uniform(0, 6.3))
            _fill(image, polygon, _colour(rng))
            folder = root / split / CLASSIFY_NAMES[cls]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i:06d}.png"), image)
    return root


def _write_paired_layout(
    root: Path, n_train: int, n_val: int, imgsz: int, seed: int, folder: str, suffix: str, draw: Callable, **data
) -> Path:
    """Images plus one target map per image under ``root/<folder>/<split>/``; ``draw(rng) -> (image, target)``."""
    rng = np.random.default_rng(seed)
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / folder / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, target = draw(rng)
            cv2.imwrite(str(root / "images" / split / f"{i:06d}.png"), image)
            if suffix == ".npy":
                np.save(root / folder / split / f"{i:06d}.npy", target)
            else:
                cv2.imwrite(str(root / folder / split / f"{i:06d}{suffix}"), target)
    meta = {"path": str(root), "train": "images/train", "val": "images/val", **data}
    (root / "data.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return root / "data.yaml"


def _shapes_with_maps(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """An image with 1-4 discs or triangles, and each shape's filled polygon (px) and class (1 disc, 2 triangle)."""
    image = _background(rng, imgsz)
    shapes = []
    for cx, cy, half in _cells(rng, imgsz, int(rng.integers(1, GRID * GRID + 1))):
        cls = int(rng.integers(1, len(SEMANTIC_NAMES)))
        polygon = regular_polygon(cx, cy, half * rng.uniform(0.6, 1.0), (24, 3)[cls - 1], rng.uniform(0, 2 * np.pi))
        _fill(image, polygon, _colour(rng))
        shapes.append((polygon, cls))
    return image, shapes


def semantic_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Discs and triangles with per-pixel class masks (PNG, 0 background); returns ``data.yaml``."""

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, shapes = _shapes_with_maps(rng, imgsz)
        mask = np.zeros((imgsz, imgsz), np.uint8)
        for polygon, cls in shapes:
            cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], cls)
        return image, mask

    names = dict(enumerate(SEMANTIC_NAMES))
    return _write_paired_layout(Path(root), n_train, n_val, imgsz, seed, "masks", ".png", draw, masks_dir="masks",
                                names=names)  # fmt: skip


def depth_dataset(root: Path, n_train: int = 8, n_val: int = 4, imgsz: int = 64, seed: int = 0) -> Path:
    """Flat shapes in front of a wall, with float32 depth maps in metres (``.npy``); returns ``data.yaml``."""

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, shapes = _shapes_with_maps(rng, imgsz)
        depth = np.full((imgsz, imgsz), DEPTH_BACKGROUND, np.float32)
        for polygon, _ in shapes:
            cv2.fillPoly(depth, [np.round(polygon).astype(np.int32)], float(rng.uniform(1.0, 4.0)))
        return image, depth

    return _write_paired_layout(Path(root), n_train, n_val, imgsz, seed, "depth", ".npy", draw, nc=1,
                                names={0: "depth"}, channels=3)  # fmt: skip
