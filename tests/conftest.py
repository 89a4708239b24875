"""Shared fixtures for the test suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread.

    The core tests use tiny tensors; on a shared 2-core machine torch's thread pool spends far more
    time synchronising than computing (a tiny forward takes ~0.8 s with 2 busy threads, ~0.02 s with 1).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
