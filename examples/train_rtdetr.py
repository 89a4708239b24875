"""Train RT-DETR with a RevCol backbone on a YOLO-format dataset, then validate and predict.

``import revcol`` registers the RevCol backbones with Ultralytics; after that ``RTDETR(...)`` accepts
the shipped configs by bare name (``rtdetr-revcol.yaml``: RT-DETR-L head on revcol_small;
``rtdetr-revcol-cpu.yaml``; ``rtdetr-revcol-demo.yaml``) or your own YAML with a ``revcol_*`` backbone line.
Training writes ``<project>/<name>/weights/best.pt``; this script then validates it and, with
``--source``, predicts on an image or folder and saves the annotated results.

Run:
    python examples/train_rtdetr.py --data path/to/data.yaml --epochs 72 --imgsz 640 --batch 4 --device 0
    python examples/train_rtdetr.py --data data.yaml --source path/to/images --project runs/revcol
    python examples/train_rtdetr.py --quick   # synthetic shapes, tiny model, 1 epoch on the CPU (about a minute)

Offline (no internet)? Set YOLO_OFFLINE=true in the environment: Ultralytics then skips its update and
analytics calls, and this script also keeps it from fetching a font (it uses one already on disk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from ultralytics import RTDETR

import revcol  # noqa: F401  (registers the RevCol backbones with Ultralytics)
from revcol.demo import generate_dataset, offline

# --quick: the 0.9 M-parameter demo model on a few 64 px images. RT-DETR needs at least as many anchors as
# queries: 64 px gives 8*8 + 4*4 + 2*2 = 84 anchors (strides 8, 16, 32) for the demo config's 30 queries.
QUICK = {"model": "rtdetr-revcol-demo.yaml", "epochs": 1, "imgsz": 64, "batch": 4, "device": "cpu", "workers": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; with ``--quick`` the QUICK values become the defaults (explicit options still win)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset YAML (Ultralytics/YOLO format); required unless --quick")
    parser.add_argument("--model", default="rtdetr-revcol.yaml", help="shipped config name, model YAML or .pt")
    parser.add_argument("--epochs", type=int, default=72)
    parser.add_argument("--imgsz", type=int, default=640, help="a multiple of 32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1, ... (default: Ultralytics picks)")
    parser.add_argument("--workers", type=int, default=8, help="dataloader worker processes")
    parser.add_argument("--project", help="folder for the runs (default: <Ultralytics runs_dir setting>/detect)")
    parser.add_argument("--name", default="train", help="run name inside --project")
    parser.add_argument("--source", help="image, folder or video to predict on after training")
    parser.add_argument("--quick", action="store_true", help="synthetic dataset, tiny model, 1 epoch on the CPU")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    elif not args.data:
        parser.error("--data is required (or use --quick)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common = {"imgsz": args.imgsz, "batch": args.batch, "device": args.device, "workers": args.workers}
    runs = {"project": str(Path(args.project).resolve())} if args.project else {}
    plots = not args.quick  # training curves, PR curves and labelled batches cost seconds a quick run does not need

    with contextlib.ExitStack() as stack:
        if os.environ.get("YOLO_OFFLINE", "").lower() in {"1", "true", "yes"}:
            stack.enter_context(offline())  # Ultralytics' dataset check fetches a font even when offline
        data = args.data
        if args.quick and not data:
            if args.project:  # kept next to the runs, for a look
                root = Path(args.project) / "dataset"
            else:  # deleted when the script ends
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="revcol-quick-")))
            data = str(generate_dataset(root, n_train=16, n_val=8, imgsz=args.imgsz, n_test=4))
            print(f"synthetic dataset: {data}")
            args.source = args.source or str(root / "images" / "test")

        model = RTDETR(args.model)
        model.train(data=data, epochs=args.epochs, name=args.name, plots=plots, **runs, **common)
        save_dir = Path(model.trainer.save_dir)  # <project>/<name>, or <name>2, 3, ... if that exists already
        weights = save_dir / "weights"
        best = weights / "best.pt" if (weights / "best.pt").is_file() else weights / "last.pt"

        # A fresh model from the file, as you would load it in another process (unpickling imports revcol).
        trained = RTDETR(str(best))
        metrics = trained.val(data=data, name=f"{save_dir.name}-val", exist_ok=True, plots=plots, **runs, **common)
        print(f"validation of {best.name}: mAP50 {metrics.box.map50:.3f}  mAP50-95 {metrics.box.map:.3f}")

        if args.source:
            results = trained.predict(
                source=args.source,
                imgsz=args.imgsz,
                device=args.device,
                save=True,
                name=f"{save_dir.name}-predict",
                exist_ok=True,
                verbose=False,
                stream=True,  # a generator: results of a long video or a big folder need not fit in memory
                **runs,
            )
            images = boxes = 0
            for result in results:
                images, boxes = images + 1, boxes + len(result.boxes)
            print(f"predictions: {images} images, {boxes} boxes, saved in {trained.predictor.save_dir}")

    print(f"best weights: {best}")
    print(f"last weights: {weights / 'last.pt'}")


if __name__ == "__main__":
    main()
