"""The network of docs/design.md written independently of ``revcol``: its parameter names and shapes, and its
forward in functional ops on a model's own parameters. The oracle of the core tests and of RevCol-H's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expected_parameters(channels, layers, num_subnet, kernel_size=3) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes generated from the section-4 patterns and the section-1 layer shapes."""
    c = channels
    shapes = {
        "stem.0.weight": (c[0], 3, 4, 4),
        "stem.0.bias": (c[0],),
        "stem.1.weight": (c[0],),
        "stem.1.bias": (c[0],),
    }
    for i in range(num_subnet):
        for level in range(4):
            cl = c[level]
            prefix = f"subnet{i}.level{level}"
            shapes[f"subnet{i}.alpha{level}"] = (1, cl, 1, 1)
            if level >= 1:
                shapes[f"{prefix}.fusion.down.0.weight"] = (cl, c[level - 1], 2, 2)
                shapes[f"{prefix}.fusion.down.0.bias"] = (cl,)
                shapes[f"{prefix}.fusion.down.1.weight"] = (cl,)
                shapes[f"{prefix}.fusion.down.1.bias"] = (cl,)
            if i >= 1 and level <= 2:
                shapes[f"{prefix}.fusion.up.channel_reschedule.0.weight"] = (cl, c[level + 1])
                shapes[f"{prefix}.fusion.up.channel_reschedule.0.bias"] = (cl,)
                shapes[f"{prefix}.fusion.up.channel_reschedule.1.weight"] = (cl,)
                shapes[f"{prefix}.fusion.up.channel_reschedule.1.bias"] = (cl,)
            for j in range(layers[level]):
                block = f"{prefix}.blocks.{j}"
                shapes[f"{block}.dwconv.weight"] = (cl, 1, kernel_size, kernel_size)
                shapes[f"{block}.dwconv.bias"] = (cl,)
                shapes[f"{block}.norm.weight"] = (cl,)
                shapes[f"{block}.norm.bias"] = (cl,)
                shapes[f"{block}.pwconv1.weight"] = (4 * cl, cl)
                shapes[f"{block}.pwconv1.bias"] = (4 * cl,)
                shapes[f"{block}.pwconv2.weight"] = (cl, 4 * cl)
                shapes[f"{block}.pwconv2.bias"] = (cl,)
                shapes[f"{block}.gamma"] = (cl,)
    return shapes


def _ln_channels_first(x, weight, bias):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, 1e-6).permute(0, 3, 1, 2)


def _upsample_reference(
    p: dict[str, torch.Tensor], name: str, c: torch.Tensor, factor: int, size: tuple[int, int]
) -> torch.Tensor:
    """``name`` (an up path): channels-last Linear + LayerNorm, then fine pixel ``(i, j)`` reads coarse pixel
    ``(min(i // factor, h - 1), min(j // factor, w - 1))``: the one it was strided from, or the last one past it."""
    u = F.linear(
        c.permute(0, 2, 3, 1), p[f"{name}.channel_reschedule.0.weight"], p[f"{name}.channel_reschedule.0.bias"]
    )
    w, b = p[f"{name}.channel_reschedule.1.weight"], p[f"{name}.channel_reschedule.1.bias"]
    u = F.layer_norm(u, (u.shape[-1],), w, b, 1e-6).permute(0, 3, 1, 2)
    rows = (torch.arange(size[0]) // factor).clamp(max=u.shape[-2] - 1)
    cols = (torch.arange(size[1]) // factor).clamp(max=u.shape[-1] - 1)
    return u[:, :, rows][:, :, :, cols]


def reference_forward(
    p: dict[str, torch.Tensor], x: torch.Tensor, layers, num_subnet, kernel_size, level0_from_coarsest: bool = False
) -> list:
    """The network of docs/design.md in functional ops on the model's own parameters (eval mode: no drop-path).

    ``level0_from_coarsest``: RevCol-H's wiring, level 0 also adds ``fusion.up2`` of the previous column's c3 (x8).
    """

    def block(t, name):
        y = F.conv2d(
            t, p[f"{name}.dwconv.weight"], p[f"{name}.dwconv.bias"], padding=kernel_size // 2, groups=t.shape[1]
        )
        y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, (y.shape[-1],), p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], 1e-6)
        y = F.gelu(F.linear(y, p[f"{name}.pwconv1.weight"], p[f"{name}.pwconv1.bias"]))
        y = F.linear(y, p[f"{name}.pwconv2.weight"], p[f"{name}.pwconv2.bias"])
        y = y * p[f"{name}.gamma"]
        return t + y.permute(0, 3, 1, 2)

    def level_fn(i, level, c_down, c_up, c_coarsest):
        prefix = f"subnet{i}.level{level}.fusion"
        if level == 0:
            out = c_down
        else:
            out = F.conv2d(c_down, p[f"{prefix}.down.0.weight"], p[f"{prefix}.down.0.bias"], stride=2)
            out = _ln_channels_first(out, p[f"{prefix}.down.1.weight"], p[f"{prefix}.down.1.bias"])
        size = tuple(out.shape[-2:])
        if i > 0 and level < 3:
            out = out + _upsample_reference(p, f"{prefix}.up", c_up, 2, size)
        if i > 0 and level == 0 and level0_from_coarsest:
            out = out + _upsample_reference(p, f"{prefix}.up2", c_coarsest, 8, size)
        for j in range(layers[level]):
            out = block(out, f"subnet{i}.level{level}.blocks.{j}")
        return out

    x = F.conv2d(x, p["stem.0.weight"], p["stem.0.bias"], stride=4)
    x = _ln_channels_first(x, p["stem.1.weight"], p["stem.1.bias"])
    c = [torch.zeros(()) for _ in range(4)]
    for i in range(num_subnet):
        new = []
        for level in range(4):
            down = x if level == 0 else new[-1]
            up = c[level + 1] if level < 3 else None
            new.append(level_fn(i, level, down, up, c[3]) + p[f"subnet{i}.alpha{level}"] * c[level])
        c = new
    return c


def up2_parameters(channels, num_subnet) -> dict[str, tuple[int, ...]]:
    """``fusion.up2`` of the authors' RevCol-H: Linear(C3, C0) + LayerNorm(C0) at level 0 of columns 1 on."""
    c0, c3 = channels[0], channels[3]
    shapes = {}
    for i in range(1, num_subnet):
        name = f"subnet{i}.level0.fusion.up2.channel_reschedule"
        shapes |= {f"{name}.0.weight": (c0, c3), f"{name}.0.bias": (c0,), f"{name}.1.weight": (c0,)}
        shapes[f"{name}.1.bias"] = (c0,)
    return shapes
