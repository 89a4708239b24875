"""Checkpoints saved by earlier revcol releases keep loading and giving the same numbers.

``fixtures/yolo-revcol-tiny-f4fd18d.pt`` was saved by revcol at commit f4fd18d (Ultralytics 8.4.190, torch 2.14):
a tiny YOLO (its YAML is in the file: a custom RevCol of channels [8, 16, 32, 64], layers [1, 1, 1, 1], 2 columns,
drop-path 0.1, a C2f neck and a Detect head) with every parameter redrawn from ``torch.Generator().manual_seed(0)``,
then ``model.save(...)``. It pickles that layout's classes (``revcol.integration.RevColBackbone``,
``revcol.model.SubNet``, timm's ``DropPath`` inside each block). ``...-expected.pt`` holds an input and the eval output
that code computed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import revcol  # noqa: F401  (makes the RevCol classes known to Ultralytics)
from revcol.core.network import FullNet

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = FIXTURES / "yolo-revcol-tiny-f4fd18d.pt"


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ultralytics may write next to the working directory; keep it in the test's
    from ultralytics import YOLO

    return YOLO(SAVED)


def test_a_model_saved_by_an_earlier_release_predicts_the_same_numbers(saved):
    expected = torch.load(FIXTURES / "yolo-revcol-tiny-f4fd18d-expected.pt", weights_only=True)
    net = saved.model.float().eval()
    with torch.no_grad():
        out = net(expected["input"])
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, expected["output"], rtol=1e-5, atol=1e-5)


def test_a_model_saved_by_an_earlier_release_trains_on_the_reversible_path(saved):
    """Its pickled blocks run today's code: drop-path (timm's, drop_prob > 0) and the reversible backward."""
    net = saved.model.float().train()
    (backbone,) = [m for m in net.modules() if isinstance(m, FullNet)]
    assert backbone.save_memory and any(getattr(m, "drop_prob", 0) > 0 for m in backbone.modules())
    for p in net.parameters():
        p.requires_grad_(True)
    out = net(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    sum(t.float().sum() for t in _tensors(out)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())


def _tensors(out: object) -> list[torch.Tensor]:
    """Every tensor in a head's training output (a tensor, or lists, tuples and dicts of them, by release)."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]
