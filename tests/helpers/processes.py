"""The tests' subprocesses: their environment, free local ports, and running as another user."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
NETGUARD = Path(__file__).resolve().parent / "_netguard"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now: a server (a torchrun rendezvous) may bind it, and a client
    connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def revcol_env(workdir: Path, *, tests_on_path: bool = False) -> dict[str, str]:
    """Env for a ``revcol`` subprocess: offline, settings in workdir, network attempts logged, not seen as pytest.

    ``tests_on_path``: tests/ on PYTHONPATH too, for a subprocess that imports ``helpers`` or a test module.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # else Ultralytics redirects runs/
    (workdir / "ultralytics-config").mkdir(parents=True, exist_ok=True)  # else it falls back to a shared /tmp folder
    path = [str(NETGUARD), *([str(TESTS)] if tests_on_path else []), env.get("PYTHONPATH")]
    env.update(
        YOLO_OFFLINE="true",
        YOLO_CONFIG_DIR=str(workdir / "ultralytics-config"),
        REVCOL_NETWORK_LOG=str(workdir / "network.log"),
        TORCH_HOME=str(workdir / "torch"),  # an empty weights cache, not the machine's
        PYTHONPATH=os.pathsep.join(filter(None, path)),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


NOBODY = "nobody"


def needs_another_user() -> None:
    """Skip the test when it runs as root and there is no ``nobody`` to read files as."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(NOBODY)
        except KeyError:
            pytest.skip("running as root without a 'nobody' user to read the file as")


def run_as_nobody(code: str, folder: Path) -> subprocess.CompletedProcess:
    """``code`` in a Python started by root that becomes ``nobody`` once it has read a checkpoint of its own: root
    reads any file whatever its mode, another user does not. That first read imports what ``torch.load`` imports
    lazily, so ``nobody`` needs no access to the interpreter's files (CI's venv sits in a folder only root enters).
    """
    account = pwd.getpwnam(NOBODY)
    home = folder / "home"
    home.mkdir()
    warm_up = home / "warm-up.pth"
    prologue = (
        "import os, torch\nfrom revcol.checkpoints import read_checkpoint\n"
        f"torch.save({{'w': torch.ones(1)}}, {str(warm_up)!r})\nread_checkpoint({str(warm_up)!r})\n"
        f"os.unlink({str(warm_up)!r})\nos.setgid({account.pw_gid})\nos.setuid({account.pw_uid})\n"
    )
    env = revcol_env(home) | {"HOME": str(home), "YOLO_CONFIG_DIR": str(home)}
    return subprocess.run(
        [sys.executable, "-c", prologue + code], env=env, cwd=home, capture_output=True, text=True, timeout=120
    )
