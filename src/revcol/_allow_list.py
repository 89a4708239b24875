"""A scope over torch's process-wide weights-only allow-list that overlapping users in any thread share safely."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["SharedAllowList"]


class SharedAllowList:
    """Entries on torch's weights-only allow-list while at least one ``with scope.allowed():`` block runs.

    torch keeps one allow-list per process, and ``torch.serialization.safe_globals`` removes its entries on exit even
    while another thread's block still needs them. Here the first block to enter adds the entries and the last to
    leave removes them, except those already registered when the first entered: those belong to someone else and stay.
    Entries are ``(object, name)`` pairs, never bare objects, so removing them leaves alone a bare entry of the same
    object that the user added for their own loads.
    """

    def __init__(self, entries: Iterable[tuple[Callable, str]]) -> None:
        self._entries = list(entries)
        self._scope: torch.serialization.safe_globals | None = None
        self._lock = threading.Lock()
        self._users = 0

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Inside this block, ``torch.load(weights_only=True)`` in any thread accepts the entries."""
        with self._lock:
            if self._users == 0:
                # an entry someone else registered already is theirs: neither added nor removed here
                present = set(torch.serialization.get_safe_globals())
                self._scope = torch.serialization.safe_globals([e for e in self._entries if e not in present])
                self._scope.__enter__()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._scope.__exit__(None, None, None)
