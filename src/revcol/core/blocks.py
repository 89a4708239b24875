"""RevCol network modules (the network of ``docs/design.md``, section "Network").

Attribute names (``stem``, ``subnet{i}``, ``alpha{l}``, ``level{l}``, ``fusion.down``,
``fusion.up.channel_reschedule``, ``fusion.up2`` (RevCol-H), ``blocks``, ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``,
``gamma``) are fixed by the authors' ImageNet checkpoints; everything around them is ours."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerNorm2d
from torch import nn

from revcol.core.drop_path import apply_drop_path

NUM_LEVELS = 4


LAYER_SCALE_INIT = 1e-6


NORM_EPS = 1e-6


INIT_STD = 0.02


INIT_BOUND = 2.0  # timm's trunc_normal_ bounds are absolute values: +-2, i.e. 100 std at std 0.02


class Stem(nn.Sequential):
    """Patchify stem: a ``patch``-strided convolution, then LayerNorm; its output is channels-last in memory.

    Making the convolution's output channels-last makes everything after it channels-last (same logical NCHW
    shapes), so every NCHW <-> NHWC permute around the Linear layers is a view, not a copy (docs/design.md, "Data
    path"). Converting its output rather than the image keeps the convolution's saved input the caller's own tensor,
    not a second copy of the batch. A Sequential, so its parameters are ``stem.0.*`` and ``stem.1.*``.
    """

    def __init__(self, out_chs: int, patch: int = 4) -> None:
        super().__init__(nn.Conv2d(3, out_chs, kernel_size=patch, stride=patch), LayerNorm2d(out_chs, eps=NORM_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self
        return norm(conv(x).contiguous(memory_format=torch.channels_last))


class ConvNextBlock(nn.Module):
    """ConvNeXt block: depthwise conv, channels-last LayerNorm + MLP, layer scale, drop-path.

    ``drop_path`` is timm's ``DropPath`` (what checkpoints pickle), called through ``apply_drop_path`` so
    that the reversible backward's recompute reuses the masks its forward drew.
    """

    def __init__(self, dim: int, kernel_size: int = 3, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a channels-last x (FullNet runs channels-last) both permutes are views, not copies.
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + apply_drop_path(self.drop_path, (y * self.gamma).permute(0, 3, 1, 2))


class UpSample(nn.Module):
    """Channel projection of a coarser level (channels-last Linear + LayerNorm), then each pixel repeated
    ``factor`` x ``factor`` (nearest), and the last row and column repeated up to the finer map's ``size``.

    At sizes that are multiples of 32 the repeat alone gives ``size``. Where a stride floored an odd size, the
    finer map has up to ``factor - 1`` more rows than the repeat; they lie past the coarser map's last pixel,
    which is what they read, so every other pixel keeps the coarser pixel the strided convolutions made it from.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.channel_reschedule = nn.Sequential(
            nn.Linear(in_channels, out_channels), LayerNorm(out_channels, eps=NORM_EPS)
        )

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.interpolate(x, scale_factor=float(self.factor), mode="nearest")
        extra_h, extra_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
        # A trace (ONNX, TorchScript) records the pad whatever the sizes, so the graph also takes odd sizes; eager
        # code skips it where there is nothing to pad (every multiple of 32), and stays the op it always was.
        if extra_h or extra_w or torch.jit.is_tracing():
            x = F.pad(x, (0, extra_w, 0, extra_h), mode="replicate")
        return x


class Fusion(nn.Module):
    """Merges the finer level of this column (``down``) with coarser levels of the previous one (``up``, ``up2``).

    ``up`` reads the previous column's next coarser level. ``up2`` exists only with ``from_coarsest``, at
    level 0 of every column but the first: it reads the previous column's coarsest level (RevCol-H).
    """

    def __init__(self, level: int, channels: Sequence[int], first_column: bool, from_coarsest: bool = False) -> None:
        super().__init__()
        if level == 0:
            self.down: nn.Module = nn.Identity()
        else:
            self.down = nn.Sequential(
                nn.Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2),
                LayerNorm2d(channels[level], eps=NORM_EPS),
            )
        has_up = not first_column and level < NUM_LEVELS - 1
        self.up = UpSample(channels[level + 1], channels[level]) if has_up else None
        has_up2 = from_coarsest and not first_column and level == 0
        coarsest = NUM_LEVELS - 1
        self.up2 = UpSample(channels[coarsest], channels[0], 2**coarsest) if has_up2 else None
        # Which of the previous column's outputs forward reads after c_down, in order.
        self.previous_levels = (level + 1,) * has_up + (coarsest,) * has_up2

    def forward(
        self, c_down: torch.Tensor, c_up: torch.Tensor | None = None, c_coarsest: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.down(c_down)
        size = out.shape[-2:]
        if self.up is not None:
            out = out + self.up(c_up, size)
        if self.up2 is not None:
            out = out + self.up2(c_coarsest, size)
        return out


def trunc_normal_(tensor: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std^2) truncated to ``[a, b]`` (absolute bounds, as timm's).

    The distribution of timm's ``trunc_normal_``, drawn by rejection instead of through the inverse CDF: one
    ``normal_`` pass, then the values outside ``[a, b]`` drawn again until none is left. At the paper's std 0.02
    and bounds +-2 nothing is ever redrawn, so building a model costs one ``normal_`` pass and one ``aminmax``
    per weight, about half of timm's ``uniform_`` + ``erfinv_`` + affine + ``clamp_`` over the same tensor.
    """
    if not a < 0 < b:
        raise ValueError(f"trunc_normal_ needs a < 0 < b, got [{a}, {b}]")
    tensor.normal_(0.0, std)
    while tensor.numel() and not tensor.is_meta:  # a meta tensor has no values to check
        low, high = torch.aminmax(tensor)
        if low >= a and high <= b:
            break
        outside = (tensor < a) | (tensor > b)
        tensor[outside] = tensor.new_empty(int(outside.sum())).normal_(0.0, std)
    return tensor
