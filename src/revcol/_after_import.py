"""Run a function once another package has been imported: how ``import revcol`` registers with Ultralytics and timm
without importing either (or torch), so that ``import revcol`` and the ``revcol`` command start in a fraction of a
second (``docs/design.md``, section "Import time").

``when_imported(package, callback)`` calls ``callback()`` now if ``package`` is imported, or else once its import has
finished. A callback never runs while the body of one of our own modules is running in the same thread: our modules
import timm and Ultralytics themselves, and a callback that imports our modules would then meet a half-initialised
one. It waits until the outermost of our modules has finished instead. To see both moments, a finder at the front of
``sys.meta_path`` gives the modules it watches a loader that runs the real one and then reports back; it leaves
``sys.meta_path`` as soon as no callback waits, and every module keeps its own loader.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

OURS = __name__.partition(".")[0]

_lock = threading.RLock()
_waiting: dict[str, list[Callable[[], None]]] = {}  # package -> callbacks, until the package is imported
_due: list[Callable[[], None]] = []  # callbacks whose package is imported, to run once no module of ours runs
_running = threading.local()  # .depth: how many of our module bodies are running in this thread


def when_imported(package: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once the top-level ``package`` is imported: now if it is, else after its import."""
    with _lock:
        if package not in sys.modules:
            _waiting.setdefault(package, []).append(callback)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    callback()


def waiting() -> list[str]:
    """The packages whose import callbacks still wait for."""
    with _lock:
        return sorted(_waiting)


def _is_ours(name: str) -> bool:
    """Whether ``name`` is a module of our package (the finder is installed while its root runs)."""
    return name.startswith(OURS + ".")


def _run_due() -> None:
    """Run the callbacks that are due, unless a module body of ours is running in this thread."""
    while getattr(_running, "depth", 0) == 0:
        with _lock:
            if not _due:
                if not _waiting and _FINDER in sys.meta_path:
                    sys.meta_path.remove(_FINDER)
                return
            callback = _due.pop(0)
        callback()


class _Reporting(importlib.abc.Loader):
    """Runs ``loader``'s module, then reports that ``name`` has been imported."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader, self.name = loader, name

    def __getattr__(self, attr: str) -> object:
        return getattr(self.loader, attr)  # get_code, get_source, get_resource_reader ... as the loader has them

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader  # the module keeps the loader that made it
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        depth = getattr(_running, "depth", 0)
        _running.depth = depth + _is_ours(self.name)
        try:
            self.loader.exec_module(module)
        finally:
            _running.depth = depth
        with _lock:
            _due.extend(_waiting.pop(self.name, []))
        _run_due()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds our modules and the packages callbacks wait for with the finders behind it, and gives each a
    ``_Reporting`` loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not (fullname in _waiting or _is_ours(fullname)):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Reporting(spec.loader, fullname)
                return spec
        return None


_FINDER = _Finder()
