"""Files replaced atomically: a reader, a kill or a full disk sees the old file or the new one, never a part."""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_folder", "replace_atomically", "write_atomically"]


def write_atomically(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` so that a reader (or a kill) sees the old file or the new one, never a part of one.

    The temporary file is created like any new file (mode 0666 less the umask) and named after this process, so the
    next save removes what a killed writer left and never a file that a live process is still writing.
    """

    def write(temporary: Path) -> None:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as file:
            file.write(data)

    replace_atomically(path, write)
    return len(data)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` create a temporary file beside ``path``, sync it, and rename it over ``path``; sync the folder.

    If ``write`` fails (a full disk, an exception, an interrupt) the temporary file is removed and ``path`` is as it
    was; a process killed before the rename leaves ``path`` as it was too, and its temporary file is removed by the
    next replacement of the same path.
    """
    prefix = f".{path.name}."
    temporary = path.parent / f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    _sweep(path.parent, prefix)


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


def _sweep(folder: Path, prefix: str) -> None:
    """Remove the temporary files of ``prefix`` whose writing process is gone (killed during a save)."""
    for stale in folder.glob(f"{glob.escape(prefix)}*.part"):
        pid = stale.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its file alone
    return True
