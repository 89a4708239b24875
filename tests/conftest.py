"""Shared fixtures for the test suite, and how its tests share the processes of ``pytest -n`` (pytest-xdist)."""

from __future__ import annotations

import atexit
import collections
import io
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers.models import make_net
from helpers.server import TEST_ENTRY, WeightsServer

# The suite neither reads nor writes the user's Ultralytics settings (settings.json, the fonts beside it, the folders
# it names): each test process gets a folder of its own, which Ultralytics reads at its first import, after this.
assert "ultralytics" not in sys.modules, "imported before tests/conftest.py could give it its own settings folder"
_ULTRALYTICS_CONFIG = tempfile.mkdtemp(prefix="revcol-tests-ultralytics-")
os.environ["YOLO_CONFIG_DIR"] = _ULTRALYTICS_CONFIG
atexit.register(shutil.rmtree, _ULTRALYTICS_CONFIG, ignore_errors=True)

# Each xdist worker (and a plain run) computes with one intra-op thread: the tests' tensors are tiny, and on a
# 2-core machine two workers with a thread pool each would fight over the cores, their pools spending more time
# synchronising than computing. A test that wants more threads sets them itself.
torch.set_num_threads(1)

# The modules whose tests use the tiny models that the session-scoped ``trained`` fixture trains.
TRAINED_MODULES = {"test_e2e.py", "test_tasks.py", "test_export.py"}
TRAINED = "trained models"
# Seconds the slowest scopes take on a 2-core machine (subprocesses, torchrun, training). They are handed out first,
# so that no worker is left alone with one of them at the end; any other module counts 0.3 s a test. A stale name
# only costs some balance.
SLOW_SCOPES = {
    TRAINED: 80,
    "test_cli.py": 45,
    "test_examples.py": 55,
    "test_transformers.py": 15,
    "test_docs.py": 10,
    "test_fsdp.py": 35,
    "test_weights_cache.py": 30,
    "test_checkpoints_save.py": 30,
    "test_ultralytics_trainers_saves.py": 30,
    "test_benchmarks.py": 20,
    "test_distributed_checkpoints.py": 20,
    "test_ultralytics_trainers.py": 11,
    "test_timm_models.py": 10,
    "test_hooks.py": 9,
    "test_demo.py": 200,  # the default demo, as the README runs it
    "test_ultralytics_yaml_rows.py": 8,
    "test_packaging.py": 8,
    "test_distributed.py": 6,
    "test_checkpoints_numpy_meta.py": 6,
}


def _scope(nodeid: str) -> str:
    """The scope a test runs in: its module, or TRAINED for the TRAINED_MODULES."""
    module = nodeid.split("::", 1)[0]
    return TRAINED if module.rsplit("/", 1)[-1] in TRAINED_MODULES else module


@pytest.hookimpl(trylast=True)  # after pytest's own reordering inside each module, which this keeps
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scopes (``_scope``) in order of their expected seconds, slowest first: xdist hands them out in this order
    (``--no-loadscope-reorder``, pyproject.toml)."""
    counts = collections.Counter(_scope(item.nodeid) for item in items)

    def seconds(scope: str) -> float:
        return SLOW_SCOPES.get(scope.rsplit("/", 1)[-1], 0.3 * counts[scope])

    items.sort(key=lambda item: -seconds(_scope(item.nodeid)))  # stable: each module keeps its order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without the plugin
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``--dist loadscope`` (pyproject.toml) each worker runs whole modules, so a module-scoped fixture is
    built once; here also the TRAINED_MODULES together, so each of ``trained``'s models trains once.

    (Grouping by marks, ``--dist loadgroup``, does not work with pytest 9.2: xdist 3.8 renames items through an
    attribute pytest no longer reads.)
    """
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModuleScheduling(config, log)


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
def cache(tmp_path) -> Path:
    """torch's checkpoint cache as ``helpers.server.offline_weights`` points it into ``tmp_path``."""
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def body() -> bytes:
    """A backbone saved as ``{"model": state_dict}``: the body the download tests serve."""
    buffer = io.BytesIO()
    torch.save({"model": make_net(dtype=torch.float32, seed=3).state_dict()}, buffer)
    return buffer.getvalue()


@pytest.fixture
def serve(server, body, monkeypatch) -> Callable[..., WeightsServer]:
    """``serve(mode, data=None)``: ``TEST_ENTRY``'s file (``body`` unless ``data``) served in that mode, with
    REVCOL_WEIGHTS_URL pointing at the server."""
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)

    def start(mode: str = "ok", data: bytes | None = None) -> WeightsServer:
        server.files[f"/weights/{TEST_ENTRY.filename}"] = (body if data is None else data, mode)
        return server

    return start


@pytest.fixture
def source():
    """A small RevCol with non-trivial weights, whose state dict the test's checkpoints hold."""
    return make_net(dtype=torch.float32, seed=11)


@pytest.fixture
def target():
    """A model of the same configuration as ``source``, with other (freshly initialised) weights."""
    return make_net(dtype=torch.float32, seed=12, randomize=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], object]:
    """``trained(name)``: the ``helpers.training.Run`` of ``training.train(name, ...)``, trained once per process."""
    from helpers import training  # imports every Ultralytics head: only for the tests that train

    runs: dict[str, training.Run] = {}

    def get(name: str) -> training.Run:
        if name not in runs:
            runs[name] = training.train(name, tmp_path_factory.mktemp(name))
        return runs[name]

    return get
