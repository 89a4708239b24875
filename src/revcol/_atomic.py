"""Files replaced atomically, and the one sweep of what killed writers left behind.

Every file revcol writes in place (a backbone, a trainer's checkpoint, a DCP checksum record, a download) goes to a
temporary file beside it, ``.NAME.TOKEN.part``, that is synced and then renamed over ``NAME``. A reader, a kill or a
full disk sees the old file or the new one, never a part of one.

A kill leaves the temporary file behind, and the next writer of ``NAME`` removes it. How a live writer is told from
a dead one: it holds a file lock (``filelock``) on ``.NAME.TOKEN.part.lock`` from before its temporary file exists
until after it is renamed or removed, and the kernel drops that lock when the process ends, however it ends. A
temporary file whose lock anyone can take is abandoned. Process ids would not do: a dead writer's id is reused by
another process, and an id means nothing in another container or on another machine sharing the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock, Timeout

__all__ = ["fsync_folder", "new_file", "replace_atomically", "sweep", "temporary_beside", "write_atomically"]

PART = ".part"
LOCK = ".lock"

# This module's tokens, and the pid-and-random ones revcol used before the lock (those files never had a lock).
_TOKEN = re.compile(r"[0-9a-f]{16}|[0-9]+\.[0-9a-f]{8}")

_CLAIM_TRIES = 3


def write_atomically(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` so that a reader (or a kill) sees the old file or the new one, never a part of one.

    The file is created like any new file (mode 0666 less the umask). Returns the number of bytes written.
    """

    def write(temporary: Path) -> None:
        with new_file(temporary) as file:
            file.write(data)

    replace_atomically(path, write)
    return len(data)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` create a temporary file beside ``path``, sync it, and rename it over ``path``; sync the folder.

    If ``write`` fails (a full disk, an exception, an interrupt) the temporary file is removed and ``path`` is as it
    was; a process killed before the rename leaves ``path`` as it was too, and its temporary file is removed by the
    next replacement of the same path (``sweep``).
    """
    with _in_process(path):
        with temporary_beside(path) as temporary:
            write(temporary)
            fd = os.open(temporary, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)  # the rename must never publish a file whose data is still in flight
            finally:
                os.close(fd)
            os.replace(temporary, path)
        fsync_folder(path.parent)
        sweep(path.parent, [path.name])


_PATH_LOCKS: dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _in_process(path: Path) -> threading.Lock:
    """The lock that threads of this process take to replace ``path`` in turn: the file locks keep other processes
    apart, and taking turns here keeps one thread's sweep from meeting another thread's claim half made."""
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(os.path.abspath(path), threading.Lock())


def new_file(path: Path) -> BinaryIO:
    """``path`` created for writing, failing if anything is there; mode 0666 less the umask, as ``open`` gives.

    Not ``mkstemp``'s 0600: a cache or a checkpoint folder filled by one user stays readable by the others.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Claim:
    temporary: Path
    lock_path: Path
    lock: FileLock | None  # None on a filesystem without locks, where no sweep can take anything either


@contextlib.contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A new temporary name beside ``path`` that no ``sweep`` takes while the block runs.

    The block creates the file (``new_file``) and renames it or leaves it; whatever is left there is removed on the
    way out, and so is the lock file. ``OSError`` when the folder cannot be written.
    """
    claim = _claim(path)
    try:
        yield claim.temporary
    finally:
        claim.temporary.unlink(missing_ok=True)  # gone already when renamed into place
        if claim.lock is not None:
            claim.lock.release()
        with contextlib.suppress(OSError):  # some filelock releases remove it themselves
            claim.lock_path.unlink()


def _claim(path: Path) -> _Claim:
    """Lock a fresh token for ``path``: its lock file is created here (so the token is new), then locked, then
    checked to still be that file (a sweep may have taken it between the two and removed it)."""
    for _ in range(_CLAIM_TRIES):
        temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}{PART}"
        lock_path = Path(f"{temporary}{LOCK}")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            lock = FileLock(str(lock_path))
            try:
                lock.acquire(timeout=0)
            except NotImplementedError:  # flock is missing on this filesystem (some network mounts)
                return _Claim(temporary, lock_path, None)
            except Timeout:  # a sweep holds it and is removing it
                continue
            if _names(lock_path, fd):
                return _Claim(temporary, lock_path, lock)
            lock.release()
        finally:
            os.close(fd)
    raise OSError(f"could not claim a temporary file beside {path} in {_CLAIM_TRIES} tries")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def sweep(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files (and lock files) that killed writers of ``names`` left in ``folder``.

    Returns the temporary files removed. One whose lock a live writer holds is kept, and so is everything on a
    filesystem without locks; files not named like this module's (torch.hub's ``.partial``, anyone else's) are
    never touched.
    """
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for temporary in _temporaries(folder, entries, names):
        with contextlib.suppress(OSError):
            if _remove_if_abandoned(temporary):
                removed.append(temporary)
    return removed


def _temporaries(folder: Path, entries: list[str], names: Iterable[str]) -> list[Path]:
    """The temporary files of ``names`` that ``entries`` hold or held (a lock file alone counts too)."""
    found = set()
    for name in set(names):
        prefix = f".{name}."
        for entry in entries:
            rest = entry[len(prefix) :].removesuffix(LOCK) if entry.startswith(prefix) else ""
            if rest.endswith(PART) and _TOKEN.fullmatch(rest[: -len(PART)]):
                found.add(folder / f"{prefix}{rest}")
    return sorted(found)


def _remove_if_abandoned(temporary: Path) -> bool:
    """Take the lock of ``temporary`` if no live writer holds it, then remove both; whether ``temporary`` was there."""
    lock_path = Path(f"{temporary}{LOCK}")
    if os.path.islink(lock_path) or (os.path.lexists(lock_path) and not lock_path.is_file()):
        return False  # not a lock file of ours: never opened, never removed
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except (Timeout, NotImplementedError):
        return False  # a live writer holds it, or nothing can be locked here
    try:
        temporary.unlink()
        return True
    except FileNotFoundError:
        return False
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            lock_path.unlink()
