"""RevCol network modules (the network of ``docs/design.md``, section "Network").

Attribute names (``stem``, ``subnet{i}``, ``alpha{l}``, ``level{l}``, ``fusion.down``,
``fusion.up.channel_reschedule``, ``fusion.up2`` (RevCol-H), ``blocks``, ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``,
``gamma``) are fixed by the authors' ImageNet checkpoints; everything around them is ours."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from timm.layers import calculate_drop_path_rates
from torch import nn

from revcol.core.blocks import (
    INIT_BOUND,
    INIT_STD,
    LAYER_SCALE_INIT,
    NUM_LEVELS,
    ConvNextBlock,
    Fusion,
    Stem,
    trunc_normal_,
)
from revcol.core.reversible import ReverseFunction
from revcol.errors import ConfigError, InputError, RevColError

ALPHA_BOUND = 1e-3


# Size limits of a configuration, far beyond any published RevCol (RevCol-H: channels up to 2880, 8 columns, depth 6
# per level, kernel 7, 2.2 B parameters): larger values are typing mistakes, refused before anything is allocated.
MAX_CHANNELS = 16384


MAX_DEPTH = 64  # blocks per level


MAX_COLUMNS = 256


MAX_KERNEL = 63


MAX_PARAMETERS = 20_000_000_000  # the whole backbone: each dimension may be within its limit, their product not


Features = list[torch.Tensor]


# The coarsest level's stride: a smaller input leaves it no pixel. Any larger size works: each level's map has the
# floored size (H // 4, then halved and floored per level), as in timm's ConvNeXt.
MIN_SIZE = 32


class Level(nn.Module):
    """One resolution of a column: a ``Fusion`` followed by ConvNeXt blocks."""

    def __init__(
        self,
        level: int,
        channels: Sequence[int],
        kernel_size: int,
        drop_path_rates: Sequence[float],
        first_column: bool,
        from_coarsest: bool = False,
    ) -> None:
        """``drop_path_rates`` holds one rate per block, so its length is the level's depth."""
        super().__init__()
        self.fusion = Fusion(level, channels, first_column, from_coarsest)
        self.blocks = nn.Sequential(*(ConvNextBlock(channels[level], kernel_size, rate) for rate in drop_path_rates))

    @property
    def previous_levels(self) -> tuple[int, ...]:
        """The previous column's outputs that ``forward`` takes after ``c_down``, in order (see ``Fusion``)."""
        return self.fusion.previous_levels

    def forward(
        self, c_down: torch.Tensor, c_up: torch.Tensor | None = None, c_coarsest: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.blocks(self.fusion(c_down, c_up, c_coarsest))


def bounded_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` moved to ``|alpha| >= ALPHA_BOUND`` (zero counts as positive), gradient passed straight through.

    This replaces the authors' in-place clamp of the parameter: the value the column uses is the
    same, but the parameter is never edited, so inference and ONNX export see plain ops.
    """
    safe = torch.where(alpha >= 0, alpha.clamp(min=ALPHA_BOUND), alpha.clamp(max=-ALPHA_BOUND))
    # safe + 0 (not alpha + (safe - alpha), which can round to just below the bound in half precision)
    return safe.detach() + (alpha - alpha.detach())


class SubNet(nn.Module):
    """One column: four ``Level``s joined by the reversible update ``c_l' = L_l(c_{l-1}', c_{l+1}) + alpha_l c_l``.

    Each ``c_l'`` leaves the column through ``output{l}``, an ``nn.Identity`` (no parameters, no cost): the
    module that ``FullNet.feature_info`` names, so a forward hook there (how timm extracts features) sees
    exactly the returned map. The level modules return ``L_l`` before the update, and the reversible
    backward calls them again.
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_size: int,
        drop_path_rates: Sequence[Sequence[float]],
        first_column: bool,
        level0_from_coarsest: bool = False,
    ) -> None:
        """``drop_path_rates[l]`` holds the rates of level ``l``'s blocks (and so its depth)."""
        super().__init__()
        self.first_column = first_column
        for level, rates in enumerate(drop_path_rates):
            self.register_parameter(f"alpha{level}", nn.Parameter(torch.full((1, channels[level], 1, 1), 0.5)))
            self.add_module(
                f"level{level}", Level(level, channels, kernel_size, rates, first_column, level0_from_coarsest)
            )
            self.add_module(f"output{level}", nn.Identity())

    @property
    def levels(self) -> list[Level]:
        return [getattr(self, f"level{level}") for level in range(NUM_LEVELS)]

    @property
    def alphas(self) -> list[nn.Parameter]:
        return [getattr(self, f"alpha{level}") for level in range(NUM_LEVELS)]

    @property
    def output_modules(self) -> list[nn.Identity]:
        return [getattr(self, f"output{level}") for level in range(NUM_LEVELS)]

    def forward(self, x: torch.Tensor, previous: Features | None, reversible: bool = False) -> Features:
        """Run the column on stem output ``x`` and the previous column's outputs (None for the first)."""
        alphas = [bounded_alpha(alpha) for alpha in self.alphas]
        if reversible:
            return ReverseFunction.apply_column(self, x, previous, alphas)
        return self.forward_levels(x, previous, alphas)

    def forward_levels(
        self,
        x: torch.Tensor,
        previous: Features | None,
        alphas: Sequence[torch.Tensor],
        before_level=None,
    ) -> Features:
        """The column's math with plain autograd; ``before_level(l)`` runs before each level (drop-path tapes)."""
        outputs: Features = []
        for level, (module, output, alpha) in enumerate(zip(self.levels, self.output_modules, alphas, strict=True)):
            if before_level is not None:
                before_level(level)
            c_down = x if level == 0 else outputs[-1]
            # previous is None exactly for the first column, whose previous_levels are empty
            out = module(c_down, *(previous[index] for index in module.previous_levels))
            if previous is not None:
                out = torch.addcmul(out, alpha, previous[level])
            elif alpha.requires_grad and torch.is_grad_enabled():
                # The first column multiplies alpha by zeros; keeping it in the graph gives it a zero
                # gradient, which DDP(find_unused_parameters=False) needs from every parameter.
                out = out + alpha * 0
            outputs.append(output(out))
        return outputs


def _is_int(value: object) -> bool:
    # numpy integers count (Integral); True is an int to Python, not to a config
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_int_list(name: str, value: Sequence[int], limit: int) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != NUM_LEVELS
        or not all(_is_int(v) and 0 < v <= limit for v in value)
    ):
        raise ConfigError(f"{name} must be {NUM_LEVELS} ints in [1, {limit}] (one per level), got {value!r}")
    return tuple(int(v) for v in value)


def parameter_count(
    channels: Sequence[int], layers: Sequence[int], num_subnet: int, kernel_size: int, level0_from_coarsest: bool
) -> int:
    """The number of parameters of a ``FullNet`` of this configuration, computed without building it."""
    c = [int(v) for v in channels]

    def block(width: int) -> int:  # dwconv, norm, pwconv1, pwconv2 (weights and biases), gamma
        return width * kernel_size**2 + width + 2 * width + 2 * (4 * width * width) + 4 * width + width + width

    def projection(c_in: int, c_out: int) -> int:  # UpSample: Linear and LayerNorm
        return c_in * c_out + c_out + 2 * c_out

    column = sum(c[level] + layers[level] * block(c[level]) for level in range(NUM_LEVELS))  # alphas and blocks
    column += sum(4 * c[level - 1] * c[level] + c[level] + 2 * c[level] for level in range(1, NUM_LEVELS))  # down
    later = sum(projection(c[level + 1], c[level]) for level in range(NUM_LEVELS - 1))  # up, not in the first column
    later += projection(c[-1], c[0]) if level0_from_coarsest else 0
    stem = 3 * 16 * c[0] + c[0] + 2 * c[0]
    return stem + num_subnet * column + (num_subnet - 1) * later


class FullNet(nn.Module):
    """RevCol backbone: a patchify stem and ``num_subnet`` reversible columns.

    ``forward(x)`` returns the last column's ``[c0, c1, c2, c3]`` at strides 4, 8, 16, 32.
    With ``save_memory=True`` training goes through ``ReverseFunction``, which keeps no level
    activations and recomputes them in backward; evaluation always runs the plain forward.
    """

    def __init__(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        num_subnet: int,
        kernel_size: int = 3,
        drop_path: float = 0.0,
        save_memory: bool = True,
        level0_from_coarsest: bool = False,
    ) -> None:
        """``level0_from_coarsest``: level 0 of every column but the first also reads the previous column's
        level 3, projected and upsampled x8 (``fusion.up2``), as in the authors' RevCol-H."""
        super().__init__()
        channels = _check_int_list("channels", channels, MAX_CHANNELS)
        layers = _check_int_list("layers", layers, MAX_DEPTH)
        if not _is_int(num_subnet) or not 1 <= num_subnet <= MAX_COLUMNS:
            raise ConfigError(f"num_subnet must be an int in [1, {MAX_COLUMNS}], got {num_subnet!r}")
        if not _is_int(kernel_size) or not 1 <= kernel_size <= MAX_KERNEL or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd int, got {kernel_size!r} (at most {MAX_KERNEL})")
        if not isinstance(drop_path, numbers.Real) or isinstance(drop_path, bool) or not 0 <= drop_path < 1:
            raise ConfigError(f"drop_path must be a number in [0, 1), got {drop_path!r}")
        if not isinstance(save_memory, (bool, np.bool_)):
            raise ConfigError(f"save_memory must be True or False, got {save_memory!r}")
        if not isinstance(level0_from_coarsest, (bool, np.bool_)):
            raise ConfigError(f"level0_from_coarsest must be True or False, got {level0_from_coarsest!r}")
        total = parameter_count(channels, layers, int(num_subnet), int(kernel_size), bool(level0_from_coarsest))
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"this RevCol configuration would have {total:,} parameters, more than the limit of "
                f"{MAX_PARAMETERS:,} (RevCol-H has 2.2 B): channels {list(channels)}, layers {list(layers)}, "
                f"num_subnet {num_subnet}, kernel_size {kernel_size}"
            )

        self.channels, self.layers, self.num_subnet = channels, layers, int(num_subnet)
        self.kernel_size, self.drop_path, self.save_memory = int(kernel_size), float(drop_path), bool(save_memory)
        self.level0_from_coarsest = bool(level0_from_coarsest)
        self.width_list = list(channels)
        # Output l leaves the last column through its output{l} (see SubNet), so a hook there sees exactly it.
        self.feature_info = [
            {"num_chs": c, "reduction": 4 * 2**level, "module": f"subnet{num_subnet - 1}.output{level}"}
            for level, c in enumerate(channels)
        ]

        # Modules are created on the meta device so their default (kaiming) initialisation is skipped;
        # init_weights() below is then the only initialisation, on the device the caller asked for. A new
        # tensor's device follows `with torch.device(...)` on every torch; get_default_device() does not
        # before torch 2.8.
        device = torch.empty(0).device
        # One schedule over all blocks of a column, the same in every column.
        rates = iter(calculate_drop_path_rates(self.drop_path, sum(layers)))
        level_rates = [[next(rates) for _ in range(depth)] for depth in layers]
        with torch.device("meta"):
            self.stem = Stem(channels[0])
            for index in range(num_subnet):
                subnet = SubNet(channels, kernel_size, level_rates, index == 0, self.level0_from_coarsest)
                self.add_module(f"subnet{index}", subnet)
        # Allocate on the target device, uninitialised. Parameters are contiguous, the layout every tool that
        # flattens, shards or serialises them assumes (FSDP, safetensors, torch.distributed.checkpoint).
        self.to_empty(device=device)
        self.init_weights()

    @property
    def subnets(self) -> list[SubNet]:
        return [getattr(self, f"subnet{index}") for index in range(self.num_subnet)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as the paper: trunc-normal(0.02) conv/linear weights, unit norms, alpha 0.5, gamma 1e-6."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, INIT_STD, -INIT_BOUND, INIT_BOUND)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ConvNextBlock):
                module.gamma.fill_(LAYER_SCALE_INIT)
            elif isinstance(module, SubNet):
                for alpha in module.alphas:
                    alpha.fill_(0.5)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InputError`` for an input this model cannot take (``check_input``; a subclass may ask more)."""
        check_input(x)

    def forward_features(self, x: torch.Tensor) -> Features:
        """Feature maps ``[c0, c1, c2, c3]`` of the last column."""
        if not torch.jit.is_tracing():
            self.check_input(x)
        reversible = self.save_memory and self.training and torch.is_grad_enabled()
        x = self.stem(x)
        features = None
        for subnet in self.subnets:
            features = subnet(x, features, reversible=reversible)
        return features

    def forward(self, x: torch.Tensor) -> Features:
        return self.forward_features(x)


def find_backbones(module: object) -> list[FullNet]:
    """Every RevCol backbone (``FullNet``) in ``module``, itself included; none in anything that is not a module."""
    if not isinstance(module, nn.Module):
        return []
    return [m for m in module.modules() if isinstance(m, FullNet)]


def find_backbone(module: nn.Module, needed_by: str, error: type[RevColError] = ConfigError) -> FullNet:
    """The one RevCol backbone in ``module`` (a ``FullNet``, or a model holding one: a timm classifier, an
    Ultralytics model or its ``YOLO`` / ``RTDETR`` wrapper).

    ``error`` (default ``ConfigError``) saying that ``needed_by`` needs exactly one, when ``module`` holds none or
    several: which one was meant cannot be guessed.
    """
    backbones = find_backbones(module)
    if len(backbones) != 1:
        raise error(
            f"{needed_by} needs a module holding exactly one RevCol backbone (FullNet), found {len(backbones)} "
            f"in {type(module).__name__}"
        )
    return backbones[0]


def check_input(x: torch.Tensor) -> None:
    """Raise ``InputError`` (a ``ValueError``) unless ``x`` is (N, 3, H, W) with H, W at least ``MIN_SIZE``."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"RevCol expects a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"RevCol expects a 4-D tensor (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise InputError(f"RevCol expects 3 input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    height, width = x.shape[-2:]
    if height < MIN_SIZE or width < MIN_SIZE:
        raise InputError(
            f"RevCol needs H and W of at least {MIN_SIZE} (its coarsest level has stride {MIN_SIZE}), "
            f"got {height}x{width}"
        )
