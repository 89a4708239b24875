"""Ultralytics integration: one YAML line names a RevCol backbone (``docs/design.md``, section "YAML contract").

``register()`` wraps a few Ultralytics functions (never copies them) and ``unregister()`` puts
the originals back. The YAML line ``[-1, 1, revcol_small, [{options}]]`` is expanded before
Ultralytics parses the model into five layers, so the head sees the documented indexes:

    0  RevColBackbone   the backbone, returns [c0, c1, c2, c3]
    1  Index 0          stride 4
    2  Index 1          stride 8  (P3)
    3  Index 2          stride 16 (P4)
    4  Index 3          stride 32 (P5)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import pickle
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm, LayerNorm2d

from revcol.errors import ConfigError
from revcol.lr_decay import check_lr_decay
from revcol.model import ConvNextBlock, FullNet, Fusion, Level, SubNet, UpSample
from revcol.variants import VARIANTS, backbone_options, get_variant, load_weights

CONFIG_DIR = Path(__file__).parent / "configs"
CUSTOM_NAME = "revcol"
BACKBONE_NAMES = frozenset({CUSTOM_NAME, *VARIANTS})
BACKBONE_LAYERS = 5  # the backbone module and one Index per level
VARIANT_OPTIONS = frozenset({"pretrained", "save_memory", "drop_path", "kernel_size", "lr_decay"})
CUSTOM_OPTIONS = VARIANT_OPTIONS | {"channels", "layers", "num_subnet", "level0_from_coarsest"}


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
            missing = sorted({"channels", "layers", "num_subnet"} - set(options))
            if missing:
                raise ConfigError(
                    f"a custom 'revcol' backbone needs channels, layers and num_subnet; missing {missing} "
                    "(e.g. {channels: [16, 32, 64, 128], layers: [1, 1, 1, 1], num_subnet: 2})"
                )
            config = {"drop_path": 0.0, **options}
        else:
            config = get_variant(name).fullnet_kwargs(**options)
        super().__init__(**config)
        self.variant = name
        self.lr_decay = lr_decay
        load_weights(self, None if name == CUSTOM_NAME else name, pretrained)


def expand_backbone(d: dict) -> dict:
    """Rewrite a model dict whose first backbone row names a RevCol backbone into the five-layer form."""
    backbone = d.get("backbone") or []
    _check_placement(backbone, d.get("head") or [])
    if not (backbone and _is_revcol_row(backbone[0])):
        return d
    source, repeats, name, args = backbone[0]
    if source != -1 or repeats != 1:
        raise ConfigError(f"the RevCol backbone row must read [-1, 1, {name}, [...]], got {backbone[0]}")
    options = _parse_options(name, args)
    channels = options["channels"] if name == CUSTOM_NAME else get_variant(name).channels
    if not (isinstance(channels, (list, tuple)) and len(channels) == 4):
        raise ConfigError(f"RevCol option channels must be 4 ints, got {channels!r}")
    expanded = [[-1, 1, RevColBackbone.__name__, [name, options]]]
    expanded += [[0, 1, "Index", [c, level]] for level, c in enumerate(channels)]
    d["backbone"] = expanded + backbone[1:]
    _check_sources(d["backbone"] + d.get("head", []))
    return d


def without_pretrained(d: dict) -> dict:
    """A copy of model dict ``d`` whose RevCol backbone row loads no pretrained weights.

    For a model that gets trained weights right after it is built (fine-tuning or resuming from a ``.pt``):
    the ImageNet file named in its YAML is then neither needed nor read.
    """
    d = copy.deepcopy(d)
    for row in d.get("backbone") or []:
        if _is_revcol_row(row) and row[3] and isinstance(row[3][0], Mapping):
            row[3][0].pop("pretrained", None)
    return d


def names_revcol_backbone(d: dict) -> bool:
    """Whether model dict ``d`` has a RevCol backbone row."""
    return any(_is_revcol_row(row) for row in d.get("backbone") or [])


def _check_placement(backbone: list, head: list) -> None:
    """A RevCol row takes the image, so the first backbone row is the only place for it."""
    misplaced = [f"backbone row {i} {row}" for i, row in enumerate(backbone) if i and _is_revcol_row(row)]
    misplaced += [f"head row {i} {row}" for i, row in enumerate(head) if _is_revcol_row(row)]
    if misplaced:
        raise ConfigError(
            f"a RevCol backbone must be the first backbone row (it takes the image); found at {'; '.join(misplaced)}"
        )


def _is_revcol_row(row: Any) -> bool:
    """Rows naming ``revcol*``; an unknown ``revcol_*`` name fails here with the list of known ones."""
    if not (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[2], str)):
        return False
    name = row[2]
    if name.lower().startswith(CUSTOM_NAME) and name not in BACKBONE_NAMES and name != RevColBackbone.__name__:
        raise ConfigError(
            f"unknown RevCol backbone {name!r} in model YAML; known: {', '.join(sorted(BACKBONE_NAMES))} "
            f"({CUSTOM_NAME!r} takes a custom configuration)"
        )
    return name in BACKBONE_NAMES


def _parse_options(name: str, args: Any) -> dict:
    if args is None or (isinstance(args, list) and not args):
        return {}
    if isinstance(args, list) and len(args) == 1 and isinstance(args[0], Mapping):
        return dict(args[0])
    raise ConfigError(
        f"RevCol backbone {name!r} takes [] or one mapping of options, e.g. "
        f"[{{pretrained: revcol_small_1k.pth, save_memory: true, drop_path: 0.2}}], got {args!r}"
    )


def _check_sources(rows: list) -> None:
    """Every 'from' index must name an earlier layer; layer 0 (the list output) only feeds the Index rows."""
    layout = "RevCol backbone layers: 0 backbone (list), 1 stride 4, 2 stride 8, 3 stride 16, 4 stride 32"
    for i, row in enumerate(rows[BACKBONE_LAYERS:], start=BACKBONE_LAYERS):
        for source in row[0] if isinstance(row[0], list) else [row[0]]:
            if not isinstance(source, int) or not -i <= source < i:
                raise ConfigError(f"layer {i} {row} takes input from layer {source}, which does not exist. {layout}")
            if source % i == 0 and row[2] != "Index":
                raise ConfigError(f"layer {i} {row} takes the backbone's list output (layer 0); use 1-4. {layout}")


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


_SCOPE = torch.serialization.safe_globals(_checkpoint_globals())
_scope_lock = threading.Lock()
_scope_users = 0


@contextlib.contextmanager
def checkpoint_classes_allowed() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` restore RevCol modules inside this block only (any thread).

    The names resolve to stand-ins that build empty modules for the pickled state: a file that tries to call a
    RevCol class with arguments is refused. Overlapping blocks in several threads share one allow-list entry set,
    added by the first to enter and removed by the last to leave; nothing else on torch's allow-list is touched.
    """
    global _scope_users
    with _scope_lock:
        if _scope_users == 0:
            _SCOPE.__enter__()
        _scope_users += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_users -= 1
            if _scope_users == 0:
                _SCOPE.__exit__(None, None, None)


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any  # owner.__dict__[name] before register(); _MISSING if it had none
    installed: Any


class _Switch:
    """On while the registration that made a set of wrappers is in effect."""

    on = True


_MISSING = object()
_lock = threading.RLock()
_patches: list[_Patch] = []
_switch = _Switch()


def _set(owner: Any, name: str, value: Any) -> None:
    _patches.append(_Patch(owner, name, owner.__dict__.get(name, _MISSING), value))
    setattr(owner, name, value)


def _guarded(switch: _Switch, original: Callable, wrapper: Callable) -> Callable:
    """``wrapper`` while ``switch`` is on, ``original`` after it: a wrapper that unregister() had to leave in place
    (someone wrapped it in turn) then passes calls straight through."""

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (wrapper if switch.on else original)(*args, **kwargs)

    return call


def is_registered() -> bool:
    """Whether ``register()`` is in effect."""
    return bool(_patches)


def register() -> None:
    """Make the RevCol backbones nameable in Ultralytics YAMLs and loadable by its safe load. Idempotent, thread-safe.

    torch's weights-only allow-list is left as it is: the RevCol classes are allowed only while Ultralytics'
    restricted load (``ULTRALYTICS_SAFE_LOAD=true``) runs, see ``checkpoint_classes_allowed``.
    """
    with _lock:
        if _patches:
            return
        import ultralytics
        from ultralytics.utils.checks import check_version

        supported = supported_ultralytics()
        if not check_version(ultralytics.__version__, supported):
            raise RuntimeError(
                f"revcol supports ultralytics {supported}; found {ultralytics.__version__}. "
                f"Install a supported release: pip install 'ultralytics{supported}'"
            )
        try:
            _install()
        except BaseException:
            unregister()
            raise


def _install() -> None:
    from ultralytics.engine.model import Model
    from ultralytics.nn import tasks

    from revcol import trainers

    global _switch
    _switch = switch = _Switch()

    def wrap(owner: Any, name: str, make: Callable[[Callable], Callable], as_static: bool = False) -> None:
        original = getattr(owner, name)
        guarded = _guarded(switch, original, make(original))
        _set(owner, name, staticmethod(guarded) if as_static else guarded)

    _set(tasks, RevColBackbone.__name__, RevColBackbone)
    wrap(tasks, "parse_model", _wrap_parse_model)
    wrap(tasks, "check_yaml", _wrap_check_yaml)
    wrap(tasks.BaseModel, "predict", _wrap_predict)
    wrap(tasks.RTDETRDetectionModel, "predict", _wrap_predict)
    wrap(Model, "_smart_load", trainers.wrap_smart_load)
    for owner, name, make in trainers.hooks():  # every trainer, user subclasses too
        wrap(owner, name, make)
    # The one context manager every restricted load of both supported releases enters (torch_safe_load calls it,
    # whichever module a caller imported torch_safe_load from); a classmethod, so the wrapper is a staticmethod.
    wrap(tasks._SafeLoad, "loading", _wrap_safe_loading, as_static=True)


def unregister() -> None:
    """Undo ``register()``: each attribute it set gets its previous value back (by identity). Thread-safe.

    An attribute someone else replaced after ``register()`` (say, by wrapping the RevCol wrapper) keeps their
    value; the RevCol wrapper inside it then passes calls through unchanged.
    """
    with _lock:
        _switch.on = False
        while _patches:
            patch = _patches.pop()
            if patch.owner.__dict__.get(patch.name, _MISSING) is not patch.installed:
                continue
            if patch.original is _MISSING:
                delattr(patch.owner, patch.name)
            else:
                setattr(patch.owner, patch.name, patch.original)


def _wrap_parse_model(parse_model: Callable) -> Callable:
    @functools.wraps(parse_model)
    def wrapper(d, ch, verbose=True):
        return parse_model(expand_backbone(d), ch, verbose)

    return wrapper


def _wrap_check_yaml(check_yaml: Callable) -> Callable:
    @functools.wraps(check_yaml)
    def wrapper(file, *args, **kwargs):
        shipped = CONFIG_DIR / str(file)
        if str(file) == Path(file).name and not Path(file).exists() and shipped.is_file():
            return str(shipped)
        return check_yaml(file, *args, **kwargs)

    return wrapper


def _wrap_predict(predict: Callable) -> Callable:
    """Embedding a RevCol backbone layer (its output is a list) means embedding its four levels."""

    @functools.wraps(predict)
    def wrapper(self, x, *args, embed=None, **kwargs):
        if embed:
            backbones = {i for i, m in enumerate(self.model) if isinstance(m, RevColBackbone)}
            embed = sorted({j for i in embed for j in (range(i + 1, i + BACKBONE_LAYERS) if i in backbones else [i])})
        return predict(self, x, *args, embed=embed, **kwargs)

    return wrapper


def _wrap_safe_loading(loading: Callable) -> Callable:
    """Ultralytics' restricted load with the RevCol classes allowed for its duration only."""

    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[None]:
        with checkpoint_classes_allowed(), loading(*args, **kwargs):
            yield

    return wrapper
