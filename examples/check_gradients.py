"""Check that reversible training (``save_memory=True``) gives the same gradients as plain autograd.

With ``save_memory=True`` a RevCol backbone keeps no level activations in the forward and recomputes
them in backward. This script runs the same train-mode forward and backward both ways on one model
and compares every parameter's gradient and the input's (relative error in Frobenius norm). It exits
with status 1 if the worst error exceeds ``--tol``, so it can run in CI after you change the model.
The check itself is ``revcol.diagnostics``' (``randomize_``, ``gradients``, ``compare_gradients``), which your
own tests can call as well.

Run:
    python examples/check_gradients.py                          # small custom config, float64, 64x64
    python examples/check_gradients.py --variant revcol_tiny    # a paper variant (slower)
    python examples/check_gradients.py --dtype float32          # tolerance 1e-5 unless --tol is given
    python examples/check_gradients.py --quick                  # tiny config, 32x32, a second or two
"""

from __future__ import annotations

import argparse
import sys

import torch

import revcol
from revcol.diagnostics import compare_gradients, gradients, randomize_

TOLERANCE = {"float64": 1e-9, "float32": 1e-5}


def build_model(variant: str | None, quick: bool, drop_path: float) -> revcol.FullNet:
    """A paper variant by name, or a small custom RevCol (tiny with ``quick``)."""
    if variant:
        return revcol.build_variant(variant, drop_path=drop_path)
    if quick:
        return revcol.FullNet(channels=[8, 16, 24, 32], layers=[1, 1, 1, 1], num_subnet=2, drop_path=drop_path)
    return revcol.FullNet(channels=[16, 32, 48, 64], layers=[1, 1, 2, 1], num_subnet=4, drop_path=drop_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", help="a paper variant, e.g. revcol_tiny (default: a small custom config)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    parser.add_argument("--tol", type=float, help="largest accepted relative error (default 1e-9 / 1e-5 by dtype)")
    parser.add_argument("--imgsz", type=int, help="input side, at least 32 (default 64, 32 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--drop-path", type=float, default=0.2, help="nonzero, so drop-path masks are checked too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny config and 32x32 input")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = TOLERANCE[args.dtype] if args.tol is None else args.tol
    imgsz = args.imgsz or (32 if args.quick else 64)

    torch.manual_seed(args.seed)
    model = build_model(args.variant, args.quick, args.drop_path).to(dtype)
    randomize_(model, args.seed)
    x = torch.randn(args.batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(args.seed), dtype=dtype)

    # The same train-mode forward and backward both ways, with the same drop-path draws (seeded alike).
    _, plain = gradients(model, x, save_memory=False, seed=args.seed)
    _, reversible = gradients(model, x, save_memory=True, seed=args.seed)
    errors = compare_gradients(reversible, plain)

    worst = max(errors, key=errors.get)
    print(f"{len(errors)} gradients compared ({model.num_subnet} columns, {args.dtype}, {imgsz}x{imgsz})")
    print(f"input gradient relative error: {errors['input']:.3e}")
    print(f"worst relative error: {errors[worst]:.3e} ({worst}), tolerance {tol:.1e}")
    if not errors[worst] <= tol:
        print("FAIL: reversible and plain gradients differ", file=sys.stderr)
        sys.exit(1)
    print("OK: reversible and plain gradients agree")


if __name__ == "__main__":
    main()
