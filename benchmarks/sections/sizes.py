"""Section ``sizes``: what taking any input size costs. At a multiple of 32 the network against itself with the
up-sampling it had before it took odd sizes (nearest x factor alone); at an odd size against the multiple of 32
just above it."""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from benchmarks.harness import Config, build, eval_models, interleaved, max_rel_err, no_grad_forward, train_step
from benchmarks.report import SectionResult, Summary, fmt_ratio
from revcol import UpSample


def _factor_only(self: UpSample, x: torch.Tensor, size) -> torch.Tensor:
    x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.interpolate(x, scale_factor=float(self.factor), mode="nearest")


def as_before(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each ``UpSample`` of this instance set back to the plain x factor up-sampling."""
    for module in model.modules():
        if isinstance(module, UpSample):
            module.forward = types.MethodType(_factor_only, module)
    return model


def _pair(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model`` and a copy of it (same weights, same mode) that up-samples as before."""
    before = as_before(build_like(model))
    before.load_state_dict(model.state_dict())
    return model, before.train(model.training)


def build_like(model: torch.nn.Module) -> torch.nn.Module:
    return type(model)(model.channels, model.layers, model.num_subnet, drop_path=model.drop_path)


def section_sizes(cfg: Config) -> SectionResult:
    now, before = _pair(eval_models(cfg)[0])
    train_now, train_before = _pair(build(cfg))
    side = cfg.size
    odd = (side - 1, side + 5)  # e.g. 223 x 229 at 224: the sizes the issue quotes
    x = torch.randn(1, 3, side, side)
    x_odd = torch.randn(1, 3, *odd)
    batch = torch.randn(cfg.batch, 3, side, side)
    fns = {
        "eval now": functools.partial(no_grad_forward, now, x),
        "eval before": functools.partial(no_grad_forward, before, x),
        f"eval now {odd[0]}x{odd[1]}": functools.partial(no_grad_forward, now, x_odd),
        "train rev now": functools.partial(train_step, train_now, batch, "rev"),
        "train rev before": functools.partial(train_step, train_before, batch, "rev"),
    }
    same = max_rel_err(no_grad_forward(now, x), no_grad_forward(before, x))
    t = interleaved(fns, cfg.repeats, cfg.warmup)
    eval_ratio = t["eval now"] / t["eval before"]
    train_ratio = t["train rev now"] / t["train rev before"]
    odd_ratio = t[f"eval now {odd[0]}x{odd[1]}"] / t["eval now"]
    lines = [
        f"{cfg.name}, {cfg.columns} columns; eval batch 1, reversible training step batch {cfg.batch}; now: any "
        "input size; before: nearest x factor only (multiples of 32); median of "
        f"{cfg.repeats}, interleaved:",
        "",
        "| step | median s | ratio |",
        "|---|---|---|",
        f"| eval {side}x{side}, now / before | {t['eval now']:.3f} / {t['eval before']:.3f} | {eval_ratio:.2f}x |",
        f"| train {side}x{side}, now / before | {t['train rev now']:.3f} / {t['train rev before']:.3f} "
        f"| {train_ratio:.2f}x |",
        f"| eval {odd[0]}x{odd[1]} / {side}x{side}, now | {t[f'eval now {odd[0]}x{odd[1]}']:.3f} / "
        f"{t['eval now']:.3f} | {odd_ratio:.2f}x |",
        "",
        f"Outputs at {side}x{side}, now against before: max relative difference {same:.1e} (0 is bit-identical).",
    ]
    summaries = [
        Summary(
            f"any input size: {side}x{side} eval and train, now / before (outputs bit-identical)",
            "<= 1.05x, identical",
            f"{fmt_ratio(eval_ratio)} eval, {fmt_ratio(train_ratio)} train, difference {same:.0e}",
            eval_ratio <= 1.05 and train_ratio <= 1.05 and same == 0,
        ),
        Summary(f"eval {odd[0]}x{odd[1]} / {side}x{side} (info)", "-", fmt_ratio(odd_ratio), None),
    ]
    return SectionResult(lines, summaries)
