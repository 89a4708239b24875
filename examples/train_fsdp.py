"""Train a RevCol timm classifier with FSDP2 under torchrun: image folder, AdamW, layer decay, resumable checkpoints.

The model is ``timm.create_model("revcol_tiny", ...)`` (any RevCol variant), sharded with
``revcol.distributed.shard`` (one ``fully_shard`` per column and the root; ``--bf16`` for bfloat16 compute with
float32 gradient reduction). Data: an image folder with one sub-folder per class (timm's ``ImageDataset`` and
transforms). The optimizer is timm's AdamW with the authors' layer-wise lr decay (``--layer-decay``, through
the model's ``group_matcher``) and a cosine schedule. Every epoch writes a sharded checkpoint
(``torch.distributed.checkpoint``) to ``<output>/epoch-<n>``; a new run with the same ``--output`` resumes from
the last one. See docs/scaling.md.

Run:
    torchrun --nproc-per-node 8 examples/train_fsdp.py --data /data/imagenet --output runs/revcol-tiny --bf16
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_fsdp.py --data /data/imagenet --output runs/revcol-tiny   # on each node, its --node-rank
    torchrun --nproc-per-node 2 examples/train_fsdp.py --quick --output runs/quick   # generated images, CPU
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import timm
import timm.data
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import revcol  # registers the RevCol timm models
from revcol.distributed.checkpoints import load_checkpoint, save_checkpoint
from revcol.distributed.fsdp import shard

CHECKPOINT = re.compile(r"epoch-(\d+)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="image folder: <data>/train/<class>/*.jpg (or <data>/<class>/...)")
    parser.add_argument("--output", type=Path, required=True, help="checkpoints go to <output>/epoch-<n>")
    parser.add_argument("--model", default="revcol_tiny", help="a RevCol timm model name (default revcol_tiny)")
    parser.add_argument("--epochs", type=int, default=None, help="default 300 (2 with --quick)")
    parser.add_argument("--batch", type=int, default=128, help="images per rank and step")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak lr (of the head; the stem's is decayed most)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.9, help="the authors' layer-wise lr decay (1: none)")
    parser.add_argument("--warmup-epochs", type=int, default=20)
    parser.add_argument("--drop-path", type=float, default=None, help="default: the variant's")
    parser.add_argument("--imgsz", type=int, default=224, help="training crop, at least 32")
    parser.add_argument("--workers", type=int, default=8, help="data loader processes per rank")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 gradient reduction")
    parser.add_argument(
        "--quick", action="store_true", help="generated images (in <output>/images), 64 px, 2 epochs: a smoke run"
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 300
    if args.quick:
        args.batch, args.imgsz, args.workers, args.warmup_epochs = 2, 64, 0, 0
    elif args.data is None:
        parser.error("--data is required (or --quick for generated images)")
    return args


def generate_images(root: Path, classes: int = 2, per_class: int = 4, size: int = 72) -> Path:
    """A tiny image folder: each class a colour, plus noise, so that the loss can fall."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = torch.tensor([255.0 * (label == c) for c in range(3)])
        for index in range(per_class):
            noise = torch.rand(size, size, 3, generator=generator) * 96
            pixels = (colour * 0.6 + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def last_checkpoint(output: Path) -> Path | None:
    """The highest ``epoch-<n>`` folder that was completely written (``.metadata`` comes last)."""
    done = [p for p in output.glob("epoch-*") if CHECKPOINT.search(p.name) and (p / ".metadata").is_file()]
    return max(done, key=lambda p: int(CHECKPOINT.search(p.name)[1]), default=None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    data = args.data
    if args.quick and data is None:
        data = args.output / "images"  # under --output, so that every rank sees the files rank 0 writes
        if rank == 0 and not data.is_dir():
            generate_images(data)
        dist.barrier()
    root = data / "train" if (data / "train").is_dir() else data
    dataset = timm.data.ImageDataset(str(root))
    num_classes = len(dataset.reader.class_to_idx)

    # Built on the target device, then sharded: each rank keeps 1/world of the parameters.
    with torch.device(device):
        model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    data_config = timm.data.resolve_data_config({"input_size": (3, args.imgsz, args.imgsz)}, model=model)
    dataset.transform = timm.data.create_transform(**data_config, is_training=True)
    shard(model, mixed_precision=args.bf16)

    # The model's group_matcher gives timm the authors' column-aware depth of each parameter, no_weight_decay
    # the alphas; after shard() the parameters are the sharded ones, their names unchanged.
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay
    )
    scheduler = timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=args.epochs, warmup_t=args.warmup_epochs, warmup_lr_init=args.lr * 1e-3
    )
    start = 0
    resume = last_checkpoint(args.output)
    if resume is not None:
        start = load_checkpoint(resume, model, optimizer)["epoch"]
        if rank == 0:
            print(f"resumed from {resume} at epoch {start}", flush=True)

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True)
    loader = DataLoader(dataset, args.batch, sampler=sampler, num_workers=args.workers, drop_last=True)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        scheduler.step(epoch)  # timm's scheduler applies each layer-decay group's lr_scale
        model.train()
        total, steps = torch.zeros((), device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        dist.all_reduce(total)
        mean = total.item() / max(1, steps * world)
        checkpoint = save_checkpoint(args.output / f"epoch-{epoch + 1}", model, optimizer, {"epoch": epoch + 1})
        if not math.isfinite(mean):
            raise RuntimeError(f"epoch {epoch + 1}: the loss is {mean}")
        if rank == 0:
            peak = max(group["lr"] for group in optimizer.param_groups)
            print(f"epoch {epoch + 1}/{args.epochs}  loss {mean:.4f}  lr {peak:.2e}  {steps} steps", flush=True)
            print(f"checkpoint: {checkpoint}", flush=True)
    if rank == 0:
        print(f"done: {args.model} ({revcol.__name__} {revcol.__version__}), {world} ranks", flush=True)


if __name__ == "__main__":
    main()
