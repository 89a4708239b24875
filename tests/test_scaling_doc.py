"""docs/scaling.md: the RevCol-H memory per rank is what the real parameter count gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from revcol import VARIANTS, FullNet

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
GIB = 2**30


@pytest.fixture(scope="module")
def huge() -> FullNet:
    with torch.device("meta"):  # 2.15 B parameters, no memory
        return FullNet(**VARIANTS["revcol_huge"].fullnet_kwargs())


def test_revcol_huge_memory_per_rank_table(huge):
    if not DOC.is_file():
        pytest.skip("docs/ is not part of this installation")
    text = DOC.read_text()
    prose = " ".join(text.split())  # line breaks of the prose do not matter
    params = sum(p.numel() for p in huge.parameters())
    column = max(sum(p.numel() for p in c.parameters()) for c in huge.subnets)
    assert f"{params:,} backbone parameters" in prose
    assert f"{column:,} per column ({4 * column / GIB:.2f} GiB in float32, {2 * column / GIB:.2f} GiB" in prose
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    for ranks, *cells in rows:
        n = int(ranks)
        expected = [4 * params / n, 4 * params / n, 8 * params / n, 16 * params / n]  # fp32 weights, grads, AdamW
        assert cells == [f"{b / GIB:.2f}" for b in expected], ranks
