"""The authors' layer-wise lr decay (``revcol.core.param_groups``): the column-aware depth of every parameter, checked
against a table computed by hand, and the lr factor of each depth."""

from __future__ import annotations

import pytest
from helpers.models import TINY_CHANNELS

from revcol import FullNet
from revcol.core.param_groups import depth_map, layer_id, lr_scale, num_layers

# layers [1, 2, 1, 1] (5 block rows, levels start at rows 0, 1, 3, 4) and 3 columns, by hand:
# dp[i][j] = min(dp[i][j-1], dp[i-1][j]) + 1 from dp[i][0] = i, dp[0][j] = j, then + 1 everywhere.
LAYERS, COLUMNS = [1, 2, 1, 1], 3


HAND_DP = [
    [1, 2, 3],
    [2, 3, 4],
    [3, 4, 5],
    [4, 5, 6],
    [5, 6, 7],
]


HAND_IDS = {
    "stem.0.weight": 0,
    "stem.1.bias": 0,
    "subnet0.alpha0": 1,
    "subnet2.alpha3": 3,  # every alpha of a column sits at the column's first row
    "subnet0.level0.blocks.0.dwconv.weight": 1,
    "subnet1.level1.blocks.0.pwconv1.weight": 3,  # row 1
    "subnet1.level1.blocks.1.gamma": 4,  # row 2
    "subnet2.level3.blocks.0.norm.bias": 7,  # row 4, the last block
    "subnet0.level2.fusion.down.0.weight": 4,  # level 2 starts at row 3
    "subnet2.level0.fusion.up.channel_reschedule.0.weight": 3,
    "model.5.cv1.conv.weight": 8,  # outside the backbone: dp[-1][-1] + 1
}


def test_depth_map_matches_the_hand_computed_table():
    assert depth_map(LAYERS, COLUMNS) == HAND_DP
    assert num_layers(LAYERS, COLUMNS) == 9
    assert depth_map([2, 2, 4, 2], 8)[-1][-1] == 10 + 8 - 1  # RevCol-S: 10 block rows, 8 columns


@pytest.mark.parametrize(("name", "expected"), HAND_IDS.items())
def test_layer_ids_and_lr_scales(name, expected):
    assert layer_id(name, LAYERS, COLUMNS) == expected
    assert lr_scale(name, LAYERS, COLUMNS, 0.5) == 0.5 ** (9 - expected - 1)


def test_every_backbone_parameter_has_a_depth_and_the_head_keeps_the_base_lr():
    net = FullNet(TINY_CHANNELS, LAYERS, COLUMNS)
    ids = {name: layer_id(name, LAYERS, COLUMNS) for name, _ in net.named_parameters()}
    assert set(ids.values()) == set(range(8))  # stem 0 ... the last column's last block 7
    assert lr_scale("model.9.weight", LAYERS, COLUMNS, 0.85) == 1.0
    with pytest.raises(ValueError, match=r"subnet0\.unknown"):
        layer_id("subnet0.unknown", LAYERS, COLUMNS)
