"""The RevCol authors' layer-wise learning-rate decay, as a pure function of the backbone layout.

A backbone of ``D = sum(layers)`` block rows and ``N`` columns is laid out on a grid: block row ``i`` of column
``j`` sits at depth ``dp[i][j] = min(dp[i][j-1], dp[i-1][j]) + 1`` (with ``dp[i][0] = i``, ``dp[0][j] = j``),
plus one so that the stem alone has depth 0. A parameter at depth ``id`` trains with
``base_lr * rate ** (num_layers - id - 1)``, where ``num_layers = dp[-1][-1] + 2``: the stem gets the smallest
rate, everything outside the backbone (the head) the base lr. This follows the authors' detection code
(``layer_decay_optimizer_constructor.py``).

Which parameters weight decay leaves alone is decided here too (``exempt_from_weight_decay``), for the Ultralytics
trainers and the timm models alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Real

from revcol.errors import ConfigError

_ALPHA = re.compile(r"subnet(\d+)\.alpha\d+$")
_BLOCK = re.compile(r"subnet(\d+)\.level(\d+)\.blocks\.(\d+)\.")
_FUSION = re.compile(r"subnet(\d+)\.level(\d+)\.fusion\.")
_NO_DECAY = re.compile(r"subnet\d+\.(alpha\d+|level\d+\.blocks\.\d+\.gamma)")


def check_lr_decay(rate: object) -> float | None:
    """``rate`` as a float in (0, 1], or None for no layer-wise decay; anything else is a ConfigError."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 < rate <= 1:
        raise ConfigError(f"RevCol option lr_decay must be a number in (0, 1] (e.g. 0.85), got {rate!r}")
    return float(rate)


def depth_map(layers: Sequence[int], num_subnet: int) -> list[list[int]]:
    """``dp[i][j]``: the depth of block row ``i`` (over all levels) in column ``j``, counted from 1 (the stem is 0)."""
    rows = sum(layers)
    dp = [[0] * num_subnet for _ in range(rows)]
    for i in range(rows):
        for j in range(num_subnet):
            dp[i][j] = i if j == 0 else j if i == 0 else min(dp[i][j - 1], dp[i - 1][j]) + 1
    return [[d + 1 for d in row] for row in dp]


def num_layers(layers: Sequence[int], num_subnet: int) -> int:
    """The number of depths: the stem, every grid depth, and one for all parameters outside the backbone."""
    return depth_map(layers, num_subnet)[-1][-1] + 2


def layer_id(name: str, layers: Sequence[int], num_subnet: int) -> int:
    """The depth of a parameter named as in the backbone's state dict (``stem.0.weight``, ``subnet1.alpha0``, ...).

    Names that belong to no backbone part (parameters outside the backbone) get the head's depth.
    """
    dp = depth_map(layers, num_subnet)
    if name.startswith("stem."):
        return 0
    if match := _ALPHA.match(name):
        return dp[0][int(match[1])]
    if match := _BLOCK.match(name):
        column, level, block = map(int, match.groups())
        return dp[sum(layers[:level]) + block][column]
    if match := _FUSION.match(name):
        column, level = map(int, match.groups())
        return dp[sum(layers[:level])][column]
    if re.match(r"subnet\d+\.", name):
        raise ValueError(f"{name!r} is not a RevCol column parameter this depth map knows")
    return dp[-1][-1] + 1


def lr_scale(name: str, layers: Sequence[int], num_subnet: int, rate: float) -> float:
    """The factor on the base lr of the parameter ``name`` (see ``layer_id``) under layer-wise decay ``rate``."""
    return rate ** (num_layers(layers, num_subnet) - layer_id(name, layers, num_subnet) - 1)


def exempt_from_weight_decay(name: str) -> bool:
    """Whether weight decay must leave the backbone parameter ``name`` (named as in the backbone's state dict) alone:
    a column's ``alpha`` or a block's layer-scale ``gamma``.

    Both are gains, not weights: decay would pull every column's reversible update and every block's residual
    branch toward zero. Norm weights and biases are not named here, because Ultralytics' and timm's optimizer
    builders already exempt them.
    """
    return _NO_DECAY.fullmatch(name) is not None
