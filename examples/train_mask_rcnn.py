"""Train torchvision's Mask R-CNN with a RevCol backbone (``revcol.torchvision.revcol_fpn_backbone``) on generated
shapes with masks, then predict on images it has not seen.

The images are revcol's synthetic shapes (``revcol.demo.shapes.make_image``: circles, squares and triangles on a
noisy background, never overlapping). Each shape's mask is the bright pixels of its box: shapes are painted at an
HSV value of at least 200, the background stays far below. Nothing is downloaded unless ``--pretrained`` names
published weights (``in1k``, or ``in1k_ft_coco``: the backbone of the authors' COCO Cascade Mask R-CNN).

Run:
    python examples/train_mask_rcnn.py --variant revcol_tiny --pretrained in1k_ft_coco --device cuda
    python examples/train_mask_rcnn.py --variant revcol_small --pretrained in1k --trainable-columns 4
    python examples/train_mask_rcnn.py --quick   # a tiny custom RevCol on the CPU: a few seconds, losses falling
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from revcol.demo.shapes import CLASSES, make_image
from revcol.torchvision import revcol_fpn_backbone

# --quick: a tiny custom RevCol, a small FPN and small heads (small_heads) on a few 96 px images.
QUICK_CONFIG = {"channels": (16, 32, 48, 64), "layers": (1, 1, 1, 1), "num_subnet": 2}
QUICK = {"steps": 20, "images": 16, "imgsz": 96, "batch": 4, "out_channels": 32, "lr": 1e-3, "device": "cpu"}
# A shape's colour has a channel of at least 200; the background's channels are at most 109 plus noise of sigma 14.
BRIGHT = 185
HELD_OUT = 4  # images generated after the training set, for the predictions at the end
SCORE = 0.5  # the score above which a prediction is counted


def make_sample(rng: np.random.Generator, imgsz: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One RGB image in [0, 1] and its target in torchvision's format: boxes (x0, y0, x1, y1), labels, masks."""
    image, shapes = make_image(rng, imgsz)  # BGR; per shape (class, cx, cy, w, h), normalised
    bright = image.max(axis=2) >= BRIGHT
    boxes, labels, masks = [], [], []
    for kind, cx, cy, w, h in shapes:
        x0, y0 = round((cx - w / 2) * imgsz), round((cy - h / 2) * imgsz)
        x1, y1 = x0 + round(w * imgsz), y0 + round(h * imgsz)
        mask = np.zeros((imgsz, imgsz), np.uint8)
        mask[y0:y1, x0:x1] = bright[y0:y1, x0:x1]
        boxes.append([x0, y0, x1, y1])
        labels.append(kind + 1)  # torchvision's class 0 is the background
        masks.append(mask)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)),
    }
    rgb = torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).permute(2, 0, 1).float() / 255
    return rgb, target


def build_model(args: argparse.Namespace) -> MaskRCNN:
    """Mask R-CNN on a RevCol FPN backbone; the images keep their size (``min_size`` = ``max_size`` = ``imgsz``)."""
    backbone = revcol_fpn_backbone(
        QUICK_CONFIG if args.quick else args.variant,
        pretrained=args.pretrained,
        trainable_columns=args.trainable_columns,
        out_channels=args.out_channels,
    )
    num_classes = len(CLASSES) + 1  # torchvision counts the background
    # with their own predictors, torchvision takes the number of classes from them (num_classes=None)
    heads = small_heads(args.out_channels, num_classes) if args.quick else {"num_classes": num_classes}
    return MaskRCNN(backbone, min_size=args.imgsz, max_size=args.imgsz, **heads)


def small_heads(channels: int, num_classes: int) -> dict:
    """Mask R-CNN's keyword arguments for heads far narrower than torchvision's defaults (a 1024-wide box head, a
    256-channel mask head), and fewer regions per image: --quick trains in seconds on a CPU."""
    return {
        "box_head": TwoMLPHead(channels * 7 * 7, 128),  # on the 7x7 regions of torchvision's box RoI pooling
        "box_predictor": FastRCNNPredictor(128, num_classes),
        "mask_head": MaskRCNNHeads(channels, (32, 32), 1),
        "mask_predictor": MaskRCNNPredictor(32, 32, num_classes),
        "rpn_post_nms_top_n_train": 200,
        "box_batch_size_per_image": 64,
    }


def train(model: MaskRCNN, data: list, args: argparse.Namespace) -> list[float]:
    """``args.steps`` AdamW steps on batches drawn from ``data``; prints and returns each step's total loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    totals = []
    for step in range(1, args.steps + 1):
        batch = [data[i] for i in torch.randperm(len(data), generator=order)[: args.batch].tolist()]
        images = [image.to(args.device) for image, _ in batch]
        targets = [{k: v.to(args.device) for k, v in target.items()} for _, target in batch]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise SystemExit(f"step {step}: the loss is not finite ({loss.item()}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            parts = ", ".join(f"{name.removeprefix('loss_')} {value.item():.3f}" for name, value in losses.items())
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  ({parts})")
    return totals


@torch.no_grad()
def predict(model: MaskRCNN, data: list, device: str) -> None:
    """Print, per held-out image, the shapes predicted above ``SCORE`` against the shapes drawn."""
    model.eval()
    outputs = model([image.to(device) for image, _ in data])
    for index, ((_, target), output) in enumerate(zip(data, outputs, strict=True)):
        keep = output["scores"] > SCORE
        found = sorted(CLASSES[label - 1] for label in output["labels"][keep].tolist())
        drawn = sorted(CLASSES[label - 1] for label in target["labels"].tolist())
        pixels = int((output["masks"][keep] > 0.5).sum())
        print(f"held-out image {index}: drawn {drawn}, predicted {found} ({pixels} mask pixels)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; with ``--quick`` the QUICK values become the defaults (explicit options still win)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="revcol_tiny", help="revcol_tiny ... revcol_huge")
    parser.add_argument("--pretrained", help="True, a published tag (in1k, in1k_ft_coco) or a checkpoint path")
    parser.add_argument("--trainable-columns", type=int, help="train only the last N columns (default: all)")
    parser.add_argument("--out-channels", type=int, default=256, help="channels of the FPN maps")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=512, help="number of generated training images")
    parser.add_argument("--imgsz", type=int, default=256, help="image side (any size of at least 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="print the losses every N steps")
    parser.add_argument("--quick", action="store_true", help="tiny custom RevCol, a few steps on the CPU")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK, log_every=1)
        args = parser.parse_args(argv)
    if args.pretrained == "True":
        args.pretrained = True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = [make_sample(rng, args.imgsz) for _ in range(args.images + HELD_OUT)]
    model = build_model(args).to(args.device)
    body = model.backbone.body
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"Mask R-CNN on {'a tiny custom RevCol' if args.quick else args.variant} ({body.num_subnet} columns, "
        f"{model.backbone.trainable_columns} training): {trainable / 1e6:.2f} M trainable parameters; "
        f"{args.images} images of {args.imgsz} px, classes {', '.join(CLASSES)}"
    )
    totals = train(model, data[: args.images], args)
    window = max(1, len(totals) // 5)
    first, last = sum(totals[:window]) / window, sum(totals[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} steps {last:.4f}")
    predict(model, data[args.images :], args.device)


if __name__ == "__main__":
    main()
