"""numpy values in a checkpoint's pickle (mmcv-era ``meta``: a best score, a palette), read as inert placeholders.

numpy's own reconstructors cannot be allowed: ``numpy.dtype`` takes its state from the file, and a forged state
(object fields over raw bytes) makes numpy dereference pointers the file chose. revcol never uses a checkpoint's
metadata, so it rebuilds none of it: every numpy value becomes a ``NumpyValue``, built from nothing in the file.

Torch's allow-list is one per process and matched by name, so allowing anything under numpy's own names would change
what other threads' loads accept, and could hide or be hidden by entries others registered under the same names.
Instead the numpy names in the stream torch reads are renamed, byte for byte the same length (``numpy`` ->
``NUMPY``), and only the renamed names are allowed: names nobody else registers, honoured only inside ``reading()``
in the thread that entered it. The file itself is never written; the renaming is applied as it is read.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import threading
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from revcol._allow_list import SharedAllowList

__all__ = ["NumpyValue", "PatchedFile", "numpy_patches", "reading"]

# numpy 1 pickles its reconstructors under numpy.core, numpy 2 under numpy._core; numpy >= 1.25 can name a dtype's
# class (numpy.dtypes.Float64DType). These are all the numpy globals a file of plain numpy data needs.
_RECONSTRUCTORS = [
    f"{m}.{n}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")
]
_DTYPE_CLASSES = [f"numpy.dtypes.{name}" for name in vars(getattr(np, "dtypes", object)) if name.endswith("DType")]
NUMPY_GLOBALS = frozenset(["numpy.ndarray", "numpy.dtype", *_RECONSTRUCTORS, *_DTYPE_CLASSES])
_RENAMED_PREFIX = b"NUMPY"  # as long as b"numpy", which it replaces at the start of a module name

_active = threading.local()


def _renamed(name: str) -> str:
    return _RENAMED_PREFIX.decode() + name[len("numpy") :]


def _check_active() -> None:
    if not getattr(_active, "depth", 0):
        raise pickle.UnpicklingError("revcol's numpy placeholders are allowed only inside revcol's own reads")


class NumpyValue:
    """Stands for a numpy scalar, array or dtype of a checkpoint's metadata; holds nothing from the file."""

    def __init__(self, *args: object) -> None:
        _check_active()

    def __setstate__(self, state: object) -> None:
        _check_active()

    def __repr__(self) -> str:
        return "NumpyValue(not loaded)"


def _placeholder(*args: object) -> NumpyValue:
    return NumpyValue()


_SCOPE = SharedAllowList(
    [(_placeholder if name in _RECONSTRUCTORS else NumpyValue, _renamed(name)) for name in NUMPY_GLOBALS]
)


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """While this block runs, this thread's weights-only loads of a ``PatchedFile`` accept its numpy values."""
    _active.depth = getattr(_active, "depth", 0) + 1
    try:
        with _SCOPE.allowed():
            yield
    finally:
        _active.depth -= 1


def numpy_patches(stream: BinaryIO, count: int = 1) -> list[tuple[int, bytes]]:
    """The byte patches (file offset, new bytes) that rename the allowed numpy globals of ``count`` pickles.

    ``stream`` is positioned at the first pickle; offsets are ``stream.tell()`` positions; reading stops early at
    the end of the stream. Renamed are the ``GLOBAL`` opcodes that name one of ``NUMPY_GLOBALS``; any other numpy
    global stays as it is, and is refused. (Protocol 4's ``STACK_GLOBAL`` needs no renaming: torch's weights-only
    unpickler refuses protocol 4 files at their first ``FRAME``.)
    """
    patches: list[tuple[int, bytes]] = []
    for _ in range(count):
        start = stream.tell()
        if not stream.read(1):  # fewer pickles than asked for: torch.load says what is missing
            break
        stream.seek(start)
        for op, arg, position in pickletools.genops(stream):
            if op.name == "GLOBAL" and arg.replace(" ", ".", 1) in NUMPY_GLOBALS:
                patches.append((position + 1, _RENAMED_PREFIX))  # the module name follows the opcode byte
    return patches


class PatchedFile(io.RawIOBase):
    """A read-only view of a binary file with some byte ranges replaced (``numpy_patches``); seekable."""

    def __init__(self, file: BinaryIO, patches: list[tuple[int, bytes]]) -> None:
        super().__init__()
        self._file = file
        self._patches = patches

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: memoryview | bytearray) -> int:
        start = self._file.tell()
        count = self._file.readinto(buffer)
        view = memoryview(buffer).cast("B")
        for offset, data in self._patches:
            low, high = max(offset, start), min(offset + len(data), start + count)
            if low < high:
                view[low - start : high - start] = data[low - offset : high - offset]
        return count
