"""The one atomic writer and its sweep (``revcol._atomic``): a file is replaced whole or not at all, and what a killed
writer left is removed by the next writer of that file, never what a live one is writing (``docs/reliability.md``).

Kills in the middle of real saves and downloads: ``test_ultralytics_trainers_saves.py``, ``test_checkpoints_save.py``,
``test_weights_cache.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers.processes import revcol_env

from revcol import _atomic
from revcol._atomic import replace_atomically, sweep, temporary_beside, write_atomically

TOKEN = "0123456789abcdef"

# Claims a temporary file beside argv[1], writes part of it, says where, and waits (until killed).
HOLD = """
import sys
from pathlib import Path
from revcol._atomic import temporary_beside
with temporary_beside(Path(sys.argv[1])) as temporary:
    temporary.write_bytes(b"half of it")
    print(temporary, flush=True)
    sys.stdin.read()
"""


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_whole_and_keeps_files_of_live_writers(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    with temporary_beside(target) as live:  # another writer of last.pt, still at work: it holds its lock
        live.write_bytes(b"x")
        assert write_atomically(target, b"new" * 1000) == 3000
        assert target.read_bytes() == b"new" * 1000
        assert live.exists()
        assert _files(tmp_path) == sorted([live.name, f"{live.name}.lock", "last.pt"])
    assert _files(tmp_path) == ["last.pt"]  # a writer leaves nothing of its own behind
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # like any new file, not mkstemp's 0600


def test_a_failed_write_leaves_the_file_as_it_was_and_nothing_beside_it(tmp_path):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")

    def fails(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_atomically(target, fails)
    assert target.read_bytes() == b"old" and _files(tmp_path) == ["best.pt"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_writer_in_another_process_is_kept_while_alive_and_swept_once_killed(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    target = folder / "best.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=revcol_env(tmp_path),
    )  # fmt: skip
    try:
        while not (line := child.stdout.readline()).startswith(str(folder)):  # past Ultralytics' notices
            assert line, "the writer ended before it said where it writes"
        live = Path(line.strip())
        assert live.parent == folder and live.read_bytes() == b"half of it"
        write_atomically(target, b"one")
        assert _files(folder) == sorted(["best.pt", live.name, f"{live.name}.lock"])  # alive: kept
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert _files(folder) == sorted(["best.pt", live.name, f"{live.name}.lock"])  # no handler of its ran
    write_atomically(target, b"two")
    assert _files(folder) == ["best.pt"] and target.read_bytes() == b"two"


def test_the_sweep_takes_abandoned_files_lock_files_alone_and_files_of_the_pid_design(tmp_path):
    abandoned = tmp_path / f".last.pt.{TOKEN}.part"  # its writer died before its lock file was made, or after
    lock_alone = tmp_path / ".last.pt.fedcba9876543210.part.lock"  # killed between the rename and the clean-up
    pid_named = tmp_path / f".last.pt.{os.getpid()}.0a1b2c3d.part"  # revcol before the lock: a pid, never a lock
    for path in (abandoned, lock_alone, pid_named):
        path.write_bytes(b"")
    assert sweep(tmp_path, ["last.pt"]) == sorted([abandoned, pid_named])
    assert _files(tmp_path) == []


def test_the_sweep_keeps_what_is_not_a_temporary_file_of_ours(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    strangers = [
        f".last.pt.{TOKEN}.partial",  # torch.hub's
        f"last.pt.{TOKEN}.part",  # not hidden
        ".last.pt.0000.part",  # not one of our tokens
        f".other.pt.{TOKEN}.part",  # another file's: its own writer sweeps it
        f".last.pt.{TOKEN}.part.lock.old",
    ]
    for name in strangers:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f".last.pt.{TOKEN}.part").mkdir()  # named like ours, but a folder
    (tmp_path / ".last.pt.fedcba9876543210.part.lock").symlink_to(victim)  # a lock file is never followed
    assert sweep(tmp_path, ["last.pt"]) == []
    expected = [*strangers, "victim", f".last.pt.{TOKEN}.part", ".last.pt.fedcba9876543210.part.lock"]
    assert _files(tmp_path) == sorted(expected)
    assert victim.read_bytes() == b"precious"


def test_a_claim_that_a_sweep_takes_before_it_is_locked_is_given_up(tmp_path, monkeypatch):
    """The window between creating a lock file and locking it: a sweep may take the file then and remove it, so the
    writer must not go on with that name (a second sweep would take its temporary file for abandoned)."""
    target = tmp_path / "last.pt"
    first: list[str] = []

    class SweptFirst(_atomic.FileLock):
        def acquire(self, *args, **kwargs):
            if not first:
                first.append(str(self.lock_file))
                assert sweep(tmp_path, ["last.pt"]) == []  # it takes the new, unlocked lock file
                assert not os.path.exists(self.lock_file)
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(_atomic, "FileLock", SweptFirst)
    with temporary_beside(target) as temporary:
        assert f"{temporary}.lock" != first[0]  # another name, locked for real
        temporary.write_bytes(b"x")
        assert sweep(tmp_path, ["last.pt"]) == [] and temporary.exists()
    write_atomically(target, b"new")
    assert _files(tmp_path) == ["last.pt"]


def test_without_file_locks_writes_still_replace_and_the_sweep_keeps_everything(tmp_path, monkeypatch):
    class NoFlock(_atomic.FileLock):  # what filelock raises where flock is missing (some network mounts)
        def acquire(self, *args, **kwargs):
            raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(_atomic, "FileLock", NoFlock)
    abandoned = tmp_path / f".last.pt.{TOKEN}.part"
    abandoned.write_bytes(b"")
    assert write_atomically(tmp_path / "last.pt", b"new") == 3
    assert (tmp_path / "last.pt").read_bytes() == b"new"
    assert _files(tmp_path) == sorted([abandoned.name, "last.pt"])  # a live writer cannot be told from a dead one


def test_writers_in_threads_never_take_each_others_files(tmp_path):
    target = tmp_path / "last.pt"
    payloads = [bytes([n]) * 4096 for n in range(4)]
    errors: list[BaseException] = []

    def write_many(payload: bytes) -> None:
        try:
            for _ in range(25):
                write_atomically(target, payload)
        except BaseException as error:  # handed to the test
            errors.append(error)

    threads = [threading.Thread(target=write_many, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert target.read_bytes() in payloads and _files(tmp_path) == ["last.pt"]
