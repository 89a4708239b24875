"""RevCol as a plain PyTorch backbone: feature maps, reversible training, loading ImageNet weights.

Shows how to build a variant, what its four outputs look like (``feature_info``: channels and stride
of each), how much activation memory ``save_memory=True`` (reversible columns) saves in a training
step compared to ``save_memory=False``, and how to load the authors' ImageNet checkpoints (download
the file yourself, e.g. ``revcol_small_1k.pth``; nothing is downloaded here).

Run:
    python examples/backbone.py --variant revcol_small --weights revcol_small_1k.pth
    python examples/backbone.py --variant revcol_tiny --imgsz 224 --device cuda
    python examples/backbone.py --quick   # a tiny custom FullNet at 64x64; saves and reloads its own weights
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import revcol
from revcol.diagnostics import SavedTensors


def build(args: argparse.Namespace) -> revcol.FullNet:
    """The backbone to demonstrate: a paper variant, or a tiny custom one with ``--quick``."""
    if args.quick:
        return revcol.FullNet(channels=[16, 32, 64, 128], layers=[1, 1, 1, 1], num_subnet=2)
    return revcol.build_variant(args.variant)  # same as revcol.revcol_small() etc.


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Run a training forward and return the bytes autograd keeps for backward (parameters excluded)."""
    saved = SavedTensors(exclude=model.parameters())  # views of one buffer are counted once
    with saved.recording():
        outputs = model(x)
    return saved.activation_bytes, outputs


def train_step(model: revcol.FullNet, x: torch.Tensor, save_memory: bool) -> None:
    """One SGD step with a dummy loss; prints the memory kept for backward and the step time."""
    model.save_memory = save_memory  # can be switched at any time; used on the next training forward
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):  # the first step pays one-off allocation and kernel selection costs: time the second
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        kept, outputs = saved_bytes(model, x)
        loss = sum(o.float().pow(2).mean() for o in outputs)  # stands in for a detection/segmentation head
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    line = f"  save_memory={save_memory!s:5}  kept for backward {kept / 2**20:8.1f} MB"
    if x.is_cuda:
        line += f"  peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:8.1f} MB"
    print(f"{line}  step {time.perf_counter() - start:6.2f} s")


def check_round_trip(model: revcol.FullNet, args: argparse.Namespace, x: torch.Tensor) -> bool:
    """Save ``model`` as the authors' checkpoints are laid out, load it into a fresh model, compare outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "revcol_quick.pth"
        torch.save({"model": model.state_dict()}, path)
        torch.manual_seed(1)  # a different init, so an unloaded tensor would show
        fresh = build(args).to(x.device).eval()
        result = revcol.load_pretrained(fresh, path)
    print(f"round trip through {path.name}: {len(result.loaded)} tensors loaded, {len(result.skipped)} skipped")
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(model.eval()(x), fresh(x), strict=True))
    print(f"  outputs identical: {same}")
    return same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="revcol_small", choices=sorted(revcol.VARIANTS))
    parser.add_argument("--weights", type=Path, help="an authors' ImageNet checkpoint for --variant")
    parser.add_argument("--imgsz", type=int, help="input side, at least 32 (default 224, 64 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny custom model, 64x64, save/load round trip")
    args = parser.parse_args(argv)
    if args.quick and args.weights:
        parser.error("--weights needs a paper variant; --quick builds a custom model the checkpoints do not fit")
    imgsz = args.imgsz or (64 if args.quick else 224)

    torch.manual_seed(0)
    model = build(args)
    if args.weights:
        # One step at build time instead: revcol.build_variant(args.variant, pretrained=args.weights)
        result = revcol.load_pretrained(model, args.weights)
        print(f"{args.weights}: {len(result.loaded)} tensors loaded, skipped (classifier head): {result.skipped}")
    model = model.to(args.device)
    name = "custom FullNet" if args.quick else args.variant
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {model.num_subnet} columns")
    x = torch.randn(args.batch, 3, imgsz, imgsz, device=args.device)

    # Evaluation runs the plain forward whatever save_memory says; width_list is known without a forward.
    print(f"feature maps for input {tuple(x.shape)} (width_list {model.width_list}):")
    with torch.no_grad():
        features = model.eval()(x)
    for level, (info, feature) in enumerate(zip(model.feature_info, features, strict=True)):
        print(f"  c{level}: {tuple(feature.shape)}  channels {info['num_chs']}  reduction {info['reduction']}")

    if args.quick and not check_round_trip(model, args, x):
        sys.exit(1)

    # Reversible columns keep only each column's four outputs; plain autograd keeps every block's activations.
    print("one training step:")
    train_step(model, x, save_memory=False)
    train_step(model, x, save_memory=True)


if __name__ == "__main__":
    main()
