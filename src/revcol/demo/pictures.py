"""The demo's annotated pictures: predictions drawn by Ultralytics' ``Results.plot`` (``annotate``), one file per test
image and a contact sheet of the first ones (``save_predictions``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from revcol.demo.threads import IdleCores, metered_threads

if TYPE_CHECKING:
    from ultralytics.engine.results import Results

# Detections drawn in the annotated pictures. RT-DETR scores right boxes low: on the test images of four seeds, 0.3
# drew 7 more right boxes than 0.5 (of 451) and no more wrong ones.
MIN_CONF = 0.3
OVERLAP_IOU = 0.7  # of boxes overlapping more than this, only the most confident is drawn
PICTURE_SIZE = 256  # annotated pictures are drawn at this size
GRID = (4, 2)  # columns, rows of the predictions.jpg contact sheet


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


def save_predictions(
    weights: Path, images: Path, predictions_dir: Path, sheet: Path, imgsz: int, device: str, meter: IdleCores | None
) -> int:
    """Predict on every image in ``images``; save each annotated as ``predictions_dir/<stem>.jpg``.

    The first ``GRID`` pictures also go, as a contact sheet, to ``sheet``. Returns the number of pictures.
    ``meter``: sets the torch threads (None: Ultralytics' setting).
    """
    import cv2
    from ultralytics import RTDETR

    predictions_dir.mkdir(parents=True, exist_ok=True)
    detector = RTDETR(str(weights))
    pictures = []
    with metered_threads(meter, detector, "on_predict_start"):
        results = detector.predict(
            source=str(images), imgsz=imgsz, device=device, conf=MIN_CONF, stream=True, verbose=False
        )
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
