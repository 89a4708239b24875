"""What Ultralytics' restricted load (``ULTRALYTICS_SAFE_LOAD``) may restore of a RevCol model, and only there.

The RevCol names resolve to stand-ins that build empty modules for the pickled state; ``register()`` installs
``wrap_safe_loading`` on Ultralytics' ``_SafeLoad`` (``revcol.ultralytics.hooks``).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import torch

from revcol._allow_list import SharedAllowList
from revcol._legacy import old_names
from revcol.ultralytics.backbone import RevColBackbone


def _module_classes() -> tuple[type, ...]:
    """The classes a RevCol model pickles: those of a small network with every option on, built on the meta device.

    Read off the network rather than listed, so a module class added to it is never missed; torch's own classes
    are Ultralytics' to allow. RevCol base classes (``FullNet`` under ``RevColBackbone``) come too: a plain
    backbone pickles as one.
    """
    with torch.device("meta"):
        net = RevColBackbone("revcol", {**_EVERY_OPTION})
    found = [cls for module in net.modules() for cls in type(module).__mro__ if cls.__module__.startswith(_OURS)]
    return tuple(dict.fromkeys(found))


_OURS = ("revcol.", "timm.")
_EVERY_OPTION = {
    "channels": [8, 8, 8, 8],
    "layers": [1, 1, 1, 1],
    "num_subnet": 2,
    "drop_path": 0.1,
    "level0_from_coarsest": True,
}
CHECKPOINT_CLASSES = _module_classes()


def _bare_maker(cls: type) -> type:
    """What the name of ``cls`` resolves to in a restricted load: an empty ``cls`` for the pickled state to fill.

    A module pickles as NEWOBJ (``cls.__new__(cls)``) followed by BUILD (its ``__dict__``). A crafted file can use
    REDUCE instead, which calls ``cls(*args)``: ``__init__`` would then allocate a model of any size or read the
    ``pretrained`` file the arguments name. Both opcodes call this stand-in, which never runs ``__init__`` and
    refuses arguments, so only the state a real checkpoint holds can be restored.
    """

    def __new__(_maker: type, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            raise pickle.UnpicklingError(
                f"refusing to call {cls.__module__}.{cls.__qualname__} with arguments while unpickling: a RevCol "
                "checkpoint only restores module state, so this file was not written by torch.save of a model"
            )
        return cls.__new__(cls)

    return type(cls.__name__, (), {"__new__": __new__, "__module__": __name__, "__qualname__": f"bare.{cls.__name__}"})


def _checkpoint_globals() -> list[tuple[Any, str]]:
    entries = []
    for cls in CHECKPOINT_CLASSES:
        name = f"{cls.__module__}.{cls.__qualname__}"
        maker = _bare_maker(cls)
        entries += [(maker, alias) for alias in (name, *old_names(cls))]  # files saved before the module map
        # BUILD accepts an instance whose type is an allow-list value; a name with a newline is one that no GLOBAL
        # opcode can spell, so the class itself is never reachable to REDUCE.
        entries.append((cls, f"{name}\n(the class itself, for BUILD)"))
    return entries


_SCOPE = SharedAllowList(_checkpoint_globals())


@contextlib.contextmanager
def checkpoint_classes_allowed() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` restore RevCol modules inside this block only (any thread).

    The names resolve to stand-ins that build empty modules for the pickled state: a file that tries to call a
    RevCol class with arguments is refused. Overlapping blocks in several threads share one allow-list entry set,
    added by the first to enter and removed by the last to leave; nothing else on torch's allow-list is touched.
    """
    with _SCOPE.allowed():
        yield


def wrap_safe_loading(loading: Callable) -> Callable:
    """Ultralytics' restricted load with the RevCol classes allowed for its duration only."""

    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[None]:
        with checkpoint_classes_allowed(), loading(*args, **kwargs):
            yield

    return wrapper
