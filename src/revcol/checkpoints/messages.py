"""The wording checkpoint errors share, for single files (``revcol.checkpoints``) and sharded folders
(``revcol.distributed``): an exception in one line, and a long list of keys cut short."""

from __future__ import annotations

from collections.abc import Sequence

SHOWN_KEYS = 5


def describe(error: BaseException) -> str:
    """``error`` in one line: its type and the first line of its text (torch's errors run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def listed(keys: Sequence[str], n: int = SHOWN_KEYS) -> str:
    """The first ``n`` of ``keys`` in brackets, ``...`` marking that there are more."""
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
