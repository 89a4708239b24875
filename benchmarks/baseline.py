"""Reference implementation for the benchmarks: a straightforward rendering of the network in docs/design.md.

This is deliberately written the way the RevCol authors' code is organised, so that the
benchmark measures what our implementation gains over the obvious approach:

* channels-first LayerNorm spelled out as ``mean`` / ``var`` / ``sqrt`` tensor ops,
* a separate ``permute`` to channels-last and back around every channels-last op,
* with ``save_memory=True`` every column runs through an autograd Function whose forward runs
  under ``no_grad`` and whose backward, level 3 first, recomputes the level with gradients,
  reconstructs the previous column by ``(c' - F) / alpha`` and calls ``torch.autograd.backward``
  (which accumulates the parameter gradients into ``.grad`` directly),
* alpha kept away from zero by an in-place edit of the parameter before each column.

Parameter names and shapes are identical to ``revcol.FullNet`` so that state dicts load into
either model. This file is a benchmark reference only; the library never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

NUM_LEVELS = 4


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of an (N, C, H, W) tensor, written out with elementary ops."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim: int, kernel_size: int, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class UpSample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.channel_reschedule = nn.Sequential(
            nn.Linear(in_channels, out_channels), nn.LayerNorm(out_channels, eps=1e-6)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = self.channel_reschedule(x)
        x = x.permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Fusion(nn.Module):
    def __init__(self, level: int, channels: Sequence[int], first_column: bool) -> None:
        super().__init__()
        self.level, self.first_column = level, first_column
        if level == 0:
            self.down = nn.Identity()
        else:
            self.down = nn.Sequential(
                nn.Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2),
                ChannelsFirstLayerNorm(channels[level]),
            )
        if not first_column and level < NUM_LEVELS - 1:
            self.up = UpSample(channels[level + 1], channels[level])

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor) -> torch.Tensor:
        if self.first_column or self.level == NUM_LEVELS - 1:
            return self.down(c_down)
        return self.up(c_up) + self.down(c_down)


class Level(nn.Module):
    def __init__(self, level, channels, depth, kernel_size, rates, first_column) -> None:
        super().__init__()
        self.fusion = Fusion(level, channels, first_column)
        self.blocks = nn.Sequential(*(Block(channels[level], kernel_size, rate) for rate in rates[:depth]))

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.fusion(c_down, c_up))


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _Replay:
    def __init__(self, state, device: torch.device) -> None:
        self.state, self.device = state, device

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class ReverseColumn(torch.autograd.Function):
    """One column: forward without a graph; backward reconstructs, recomputes, ``autograd.backward``."""

    @staticmethod
    def forward(ctx, levels, x, c0, c1, c2, c3, a0, a1, a2, a3):
        alphas = [a0, a1, a2, a3]
        states = []
        with torch.no_grad():
            states.append(_rng_state(x.device))
            c0 = levels[0](x, c1) + alphas[0] * c0
            states.append(_rng_state(x.device))
            c1 = levels[1](c0, c2) + alphas[1] * c1
            states.append(_rng_state(x.device))
            c2 = levels[2](c1, c3) + alphas[2] * c2
            states.append(_rng_state(x.device))
            c3 = levels[3](c2, None) + alphas[3] * c3
        ctx.levels, ctx.states = levels, states
        ctx.save_for_backward(x, c0, c1, c2, c3, a0, a1, a2, a3)
        return c0, c1, c2, c3

    @staticmethod
    def backward(ctx, g0, g1, g2, g3):
        x, c0, c1, c2, c3, a0, a1, a2, a3 = ctx.saved_tensors
        outs, alphas, grads = [c0, c1, c2, c3], [a0, a1, a2, a3], [g0, g1, g2, g3]
        levels = ctx.levels
        previous = [None] * NUM_LEVELS
        grad_previous = [None] * NUM_LEVELS
        grad_alphas = [None] * NUM_LEVELS
        grad_x = None
        for level in (3, 2, 1, 0):
            c_down = (x if level == 0 else outs[level - 1]).detach().requires_grad_()
            c_up = None
            if level < NUM_LEVELS - 1:
                c_up = previous[level + 1].detach().requires_grad_()
            with torch.enable_grad(), _Replay(ctx.states[level], x.device):
                f = levels[level](c_down, c_up)
                torch.autograd.backward(f, grads[level])
            with torch.no_grad():
                previous[level] = (outs[level] - f) / alphas[level]
                grad_alphas[level] = (grads[level] * previous[level]).sum(dim=(0, 2, 3), keepdim=True)
                grad_previous[level] = grads[level] * alphas[level]
                if c_up is not None and c_up.grad is not None:
                    grad_previous[level + 1] = grad_previous[level + 1] + c_up.grad
                if level == 0:
                    grad_x = c_down.grad
                else:
                    grads[level - 1] = grads[level - 1] + c_down.grad
        return (None, grad_x, *grad_previous, *grad_alphas)


class SubNet(nn.Module):
    def __init__(self, channels, layers, kernel_size, rates, first_column) -> None:
        super().__init__()
        for level in range(NUM_LEVELS):
            self.register_parameter(f"alpha{level}", nn.Parameter(torch.full((1, channels[level], 1, 1), 0.5)))
            start = sum(layers[:level])
            level_rates = rates[start : start + layers[level]]
            self.add_module(
                f"level{level}", Level(level, channels, layers[level], kernel_size, level_rates, first_column)
            )

    def _clamp_alphas(self) -> None:
        for level in range(NUM_LEVELS):
            alpha = getattr(self, f"alpha{level}")
            with torch.no_grad():
                sign = torch.where(alpha.data >= 0, 1.0, -1.0)
                alpha.data.copy_(sign * alpha.data.abs().clamp(min=1e-3))

    def forward(self, x, c0, c1, c2, c3, reversible: bool):
        self._clamp_alphas()
        levels = [getattr(self, f"level{level}") for level in range(NUM_LEVELS)]
        alphas = [getattr(self, f"alpha{level}") for level in range(NUM_LEVELS)]
        if reversible:
            return ReverseColumn.apply(levels, x, c0, c1, c2, c3, *alphas)
        c0 = levels[0](x, c1) + alphas[0] * c0
        c1 = levels[1](c0, c2) + alphas[1] * c1
        c2 = levels[2](c1, c3) + alphas[2] * c2
        c3 = levels[3](c2, None) + alphas[3] * c3
        return c0, c1, c2, c3


class BaselineFullNet(nn.Module):
    """The reference RevCol backbone; ``forward(x)`` returns the last column's ``[c0, c1, c2, c3]``."""

    def __init__(self, channels, layers, num_subnet, kernel_size=3, drop_path=0.0, save_memory=True) -> None:
        super().__init__()
        self.channels, self.num_subnet, self.save_memory = list(channels), num_subnet, save_memory
        rates = [r.item() for r in torch.linspace(0, drop_path, sum(layers))]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(channels[0])
        )
        for index in range(num_subnet):
            self.add_module(f"subnet{index}", SubNet(channels, layers, kernel_size, rates, index == 0))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        reversible = self.save_memory and self.training and torch.is_grad_enabled()
        x = self.stem(x)
        n, _, h, w = x.shape
        cs = [x.new_zeros(n, c, h // 2**level, w // 2**level) for level, c in enumerate(self.channels)]
        for index in range(self.num_subnet):
            cs = getattr(self, f"subnet{index}")(x, *cs, reversible=reversible)
        return list(cs)
