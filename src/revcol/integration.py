"""RevCol in Ultralytics: the backbone layer, what Ultralytics' safe load may restore, the wrappers of its functions.

The YAML row that names a backbone is expanded by ``revcol.contract``; ``revcol.hooks`` installs the wrappers
below (``register()``). Nothing here patches anything by itself (``docs/design.md``, section "YAML contract").
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from timm.layers import DropPath, LayerNorm, LayerNorm2d

from revcol.allow_list import SharedAllowList
from revcol.contract import (
    BACKBONE_LAYERS,
    CONFIG_DIR,
    CUSTOM_NAME,
    CUSTOM_OPTIONS,
    VARIANT_OPTIONS,
    custom_options_error,
    expand_backbone,
    head_modules,
    missing_custom_options,
    names_revcol_backbone,
)
from revcol.errors import ConfigError
from revcol.lr_decay import check_lr_decay
from revcol.model import ConvNextBlock, FullNet, Fusion, Level, Stem, SubNet, UpSample
from revcol.variants import backbone_options, get_variant, load_weights

__all__ = ["CHECKPOINT_CLASSES", "CONFIG_DIR", "RevColBackbone", "checkpoint_classes_allowed", "supported_ultralytics"]


class RevColBackbone(FullNet):
    """A RevCol backbone as an Ultralytics layer: ``RevColBackbone("revcol_small", {"pretrained": path})``.

    ``name`` is a variant of ``revcol.VARIANTS`` or ``"revcol"`` for a custom configuration given by
    ``channels``, ``layers`` and ``num_subnet`` in ``options``. Other options: ``pretrained`` (``true``, a
    published tag or a checkpoint path, see ``revcol.variants.load_weights``), ``save_memory``,
    ``drop_path``, ``kernel_size``. Returns the list ``[c0, c1, c2, c3]``.
    """

    def __init__(self, name: str = "revcol_small", options: Mapping[str, Any] | None = None) -> None:
        # what pretrained names is decided (and the kernel size it implies filled in) before anything is built
        options = backbone_options(None if name == CUSTOM_NAME else name, options)
        allowed = CUSTOM_OPTIONS if name == CUSTOM_NAME else VARIANT_OPTIONS
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for RevCol backbone {name!r}; allowed: {sorted(allowed)}")
        pretrained = options.pop("pretrained", None)
        lr_decay = check_lr_decay(options.pop("lr_decay", None))  # read by the RevCol trainers
        if name == CUSTOM_NAME:
            missing = missing_custom_options(options)
            if missing:
                raise custom_options_error(missing)
            config = {"drop_path": 0.0, **options}
        else:
            config = get_variant(name).fullnet_kwargs(**options)
        super().__init__(**config)
        self.variant = name
        self.lr_decay = lr_decay
        load_weights(self, None if name == CUSTOM_NAME else name, pretrained)


def supported_ultralytics() -> str:
    """The Ultralytics versions this installation of revcol supports, as its package metadata declares them."""
    try:
        requirements = importlib.metadata.requires("revcol") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("revcol is not installed, so its Ultralytics range is unknown: pip install .") from None
    for requirement in requirements:
        match = re.fullmatch(r"ultralytics\s*([<>=!~][^;]*)", requirement.strip())
        if match:
            return match.group(1).replace(" ", "")
    raise RuntimeError(f"revcol's metadata names no Ultralytics version range: {requirements}")


# The classes a checkpoint of a RevCol model pickles (torch.serialization.get_unsafe_globals_in_checkpoint of a
# trained best.pt), plus FullNet for a pickled plain backbone.
CHECKPOINT_CLASSES = (
    RevColBackbone,
    FullNet,
    Stem,
    SubNet,
    Level,
    Fusion,
    UpSample,
    ConvNextBlock,
    LayerNorm,
    LayerNorm2d,
    DropPath,
)


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
        entries.append((_bare_maker(cls), name))
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


# Heads that Ultralytics added after the oldest release revcol supports, and the release that added each: a RevCol
# model naming one on an older release gets that version in the error rather than Ultralytics' bare KeyError.
HEADS_SINCE = {"SemanticSegment": "8.4.52", "Depth": "8.4.104"}


def check_heads(d: dict) -> None:
    """Refuse a model dict whose head this Ultralytics does not have yet, naming the release that has it."""
    import ultralytics
    from ultralytics.utils.checks import check_version

    for name in head_modules(d):
        since = HEADS_SINCE.get(name)
        if since and not check_version(ultralytics.__version__, f">={since}"):
            raise ConfigError(
                f"head {name!r} needs ultralytics>={since}; this is ultralytics {ultralytics.__version__}. "
                f"Upgrade: pip install 'ultralytics>={since}'"
            )


def wrap_parse_model(parse_model: Callable) -> Callable:
    """``parse_model`` on the expanded model dict (``revcol.contract.expand_backbone``)."""

    @functools.wraps(parse_model)
    def wrapper(d, ch, verbose=True):
        if names_revcol_backbone(d):
            check_heads(d)
        return parse_model(expand_backbone(d), ch, verbose)

    return wrapper


def wrap_check_yaml(check_yaml: Callable) -> Callable:
    """``check_yaml`` that finds the shipped configs by bare name (when no such file is in the working folder)."""

    @functools.wraps(check_yaml)
    def wrapper(file, *args, **kwargs):
        shipped = CONFIG_DIR / str(file)
        if str(file) == Path(file).name and not Path(file).exists() and shipped.is_file():
            return str(shipped)
        return check_yaml(file, *args, **kwargs)

    return wrapper


def wrap_predict(predict: Callable) -> Callable:
    """Embedding a RevCol backbone layer (its output is a list) means embedding its four levels."""

    @functools.wraps(predict)
    def wrapper(self, x, *args, embed=None, **kwargs):
        if embed:
            backbones = {i for i, m in enumerate(self.model) if isinstance(m, RevColBackbone)}
            embed = sorted({j for i in embed for j in (range(i + 1, i + BACKBONE_LAYERS) if i in backbones else [i])})
        return predict(self, x, *args, embed=embed, **kwargs)

    return wrapper


def wrap_safe_loading(loading: Callable) -> Callable:
    """Ultralytics' restricted load with the RevCol classes allowed for its duration only."""

    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[None]:
        with checkpoint_classes_allowed(), loading(*args, **kwargs):
            yield

    return wrapper
