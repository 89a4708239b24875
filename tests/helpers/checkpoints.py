"""Assertions on weights and on loading them (``revcol.load_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from revcol import CheckpointError, load_pretrained


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """``a`` and ``b`` have the same tensor names, in the same order, with equal values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_load_refused(model: torch.nn.Module, path: Path, pattern: str) -> None:
    """``load_pretrained(model, path)`` raises a ``CheckpointError`` matching ``pattern`` and changes nothing."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def clear_load_error(model: torch.nn.Module, path: Path, pattern: str) -> CheckpointError:
    """The ``CheckpointError`` of ``load_pretrained(model, path)``: it matches ``pattern``, names the file and is not
    chained to the error underneath (a torch traceback)."""
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_pretrained(model, path)
    error = info.value
    assert str(path) in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error
