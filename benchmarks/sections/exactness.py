"""Section ``exactness``: gradients of the reversible backward against plain autograd."""

from __future__ import annotations

import gc

import torch

from benchmarks.harness import GOALS, Config, build, gradients, layer_scale_
from benchmarks.report import SectionResult, Summary
from revcol.diagnostics import relative_error


def section_exactness(cfg: Config) -> SectionResult:
    lines = [
        "Relative gradient error per tensor, reversible vs plain autograd (same seed, drop-path on, "
        "layer scale 0.1), max over all parameters and the input:",
        "",
        "| columns | dtype | max rel. error | worst tensor | baseline (authors' style) rev vs plain |",
        "|---|---|---|---|---|",
    ]
    errors = {}
    for columns in cfg.exact_columns:
        # float64 shows whether the error is rounding only; one (small) point of it is enough
        dtypes = (torch.float32, torch.float64) if columns == cfg.exact_columns[0] else (torch.float32,)
        for dtype in dtypes:
            size = cfg.exact_size if dtype == torch.float32 else min(cfg.exact_size, 64)
            torch.manual_seed(0)
            model = layer_scale_(build(cfg, columns=columns), 0.1).to(dtype)
            base = build(cfg, "baseline", columns=columns).to(dtype)
            base.load_state_dict(model.state_dict())
            x = torch.randn(cfg.batch, 3, size, size, dtype=dtype)
            ref = gradients(model, x, "plain")
            rev = gradients(model, x, "rev")
            err = {name: relative_error(rev[name], ref[name]) for name in ref}
            name = max(err, key=err.get)
            base_rev = gradients(base, x, "rev")
            base_err = max(relative_error(base_rev[n], ref[n]) for n in ref)
            lines.append(f"| {columns} | {str(dtype)[6:]} | {err[name]:.2e} | `{name}` | {base_err:.2e} |")
            errors[(columns, dtype)] = err[name]
            del model, base
            gc.collect()
    e32 = [errors[(c, torch.float32)] for c in cfg.exact_columns]
    e64 = errors[(cfg.exact_columns[0], torch.float64)]
    cols = "/".join(str(c) for c in cfg.exact_columns)
    return SectionResult(
        lines,
        [
            Summary(
                f"fp32 grad rel. error, rev vs plain ({cols} columns)",
                f"<= {GOALS['exact']:.0e}",
                ", ".join(f"{e:.1e}" for e in e32),
                max(e32) <= GOALS["exact"],
            ),
            Summary(
                "fp64 grad rel. error, rev vs plain",
                f"<= {GOALS['exact64']:.0e}",
                f"{e64:.1e}",
                e64 <= GOALS["exact64"],
            ),
        ],
    )
