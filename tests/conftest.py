"""Shared fixtures for the test suite."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from revcol_helpers import WeightsServer, make_net


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


@pytest.fixture
def server() -> Iterator[WeightsServer]:
    """An HTTP server on 127.0.0.1 (a free port) for the test's weights files; stopped after the test."""
    httpd = WeightsServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def source():
    """A small RevCol with non-trivial weights, whose state dict the test's checkpoints hold."""
    return make_net(num_subnet=2, dtype=torch.float32, seed=11)


@pytest.fixture
def target():
    """A model of the same configuration as ``source``, with other (freshly initialised) weights."""
    return make_net(num_subnet=2, dtype=torch.float32, seed=12, randomize=False)
