"""Every Ultralytics attribute revcol replaces, declared as data, and the one mechanism that applies and restores them.

``HOOKS`` is the table (``docs/design.md``, section "YAML contract"). Each ``Hook`` names an attribute by its owner
(``"module"`` or ``"module:Class"``) and the function that makes its replacement from the original, both as import
paths, so this module imports neither Ultralytics nor the modules that wrap it until a group is applied. Groups:

* ``register``: what ``import revcol`` installs (``register()``) until ``unregister()``;
* ``offline``: what ``revcol.demo.offline()`` and the ``revcol`` command with ``YOLO_OFFLINE`` hold for a block;
* ``cli``: what the ``revcol`` command holds while Ultralytics' own entry point runs;
* ``save``: attributes of one trainer (``instance=``), held while its ``save_model`` runs;
* ``denoising``: an attribute of one RT-DETR decoder (``instance=``), held while the demo trains it.

One mechanism for all: under one lock, each attribute's previous value (from the owner's ``__dict__``, or its
absence) is kept and put back by identity; a group already in effect is not applied twice (``register``) or is
shared by overlapping blocks (the scoped groups: the first to enter applies it, the last to leave restores it).
A callable replacement is guarded: if someone else wrapped it after us, restoring leaves their wrapper in place and
ours inside it passes calls straight to the original from then on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTER, OFFLINE, CLI, SAVE, DENOISING = "register", "offline", "cli", "save", "denoising"


@dataclass(frozen=True)
class Hook:
    """One replaced attribute: ``owner.name`` becomes ``make(original, **context)`` while its group is in effect."""

    owner: str  # "package.module" or "package.module:Class"
    name: str
    make: str  # "package.module:function", called as make(original, **context) -> the replacement
    why: str
    group: str = REGISTER
    subclasses: str = ""  # a package: also every subclass of owner defined in it that defines `name` itself
    static: bool = False  # the original is a classmethod: install the (guarded) replacement as a staticmethod
    optional: bool = False  # absent on some supported Ultralytics release: skipped there
    guard: bool = True  # False for plain values (a flag, a class), which are set and restored as they are
    instance: bool = False  # owner is a class: the attribute is that of its one instance applied as instance=


TASKS = "ultralytics.nn.tasks"
TRAINER = "ultralytics.engine.trainer:BaseTrainer"
OURS, WRAPPERS, TRAINERS = __name__, "revcol.ultralytics.wrappers", "revcol.ultralytics.trainers"
# Ultralytics takes the git checkout its package sits in (a virtual environment inside a clone of revcol) for its own
# and derives these folders from it: revcol.ultralytics.wrappers.own_settings.
SETTINGS_WHY = "the settings' folder, not one of a git checkout that is not Ultralytics'"

HOOKS: tuple[Hook, ...] = (
    Hook(TASKS, "RevColBackbone", f"{OURS}:backbone_class", "the layer name an expanded row refers to",
         guard=False),
    Hook(TASKS, "parse_model", f"{WRAPPERS}:wrap_parse_model", "expand the RevCol row before parsing"),
    Hook(TASKS, "check_yaml", f"{WRAPPERS}:wrap_check_yaml", "shipped configs by bare name"),
    Hook(TASKS, "guess_model_scale", f"{WRAPPERS}:wrap_guess_model_scale",
         "a RevCol YAML's own `scale:` (or its one scale) when its file name names none: no 'Assuming scale'"),
    Hook("ultralytics.models.yolo.model:YOLO", "__init__", f"{WRAPPERS}:wrap_yolo_init",
         "a RevCol YAML with an RT-DETR head builds RT-DETR whatever its file name, as a checkpoint does"),
    Hook("ultralytics.utils", "RUNS_DIR", f"{WRAPPERS}:runs_dir", SETTINGS_WHY, guard=False),
    Hook("ultralytics.cfg", "RUNS_DIR", f"{WRAPPERS}:runs_dir", "its copy, where runs go (8.4.67)", guard=False,
         optional=True),
    Hook("ultralytics.utils", "DATASETS_DIR", f"{WRAPPERS}:datasets_dir", SETTINGS_WHY, guard=False),
    Hook("ultralytics.data.utils", "DATASETS_DIR", f"{WRAPPERS}:datasets_dir", "its copy: relative dataset paths",
         guard=False),
    Hook("ultralytics.data.converter", "DATASETS_DIR", f"{WRAPPERS}:datasets_dir", "its copy", guard=False),
    Hook("ultralytics.models.yolo.world.train_world", "DATASETS_DIR", f"{WRAPPERS}:datasets_dir", "its copy",
         guard=False),
    Hook("ultralytics.utils", "WEIGHTS_DIR", f"{WRAPPERS}:weights_dir", SETTINGS_WHY, guard=False),
    Hook(f"{TASKS}:BaseModel", "predict", f"{WRAPPERS}:wrap_predict", "embed= of layer 0 means its 4 maps"),
    Hook(f"{TASKS}:RTDETRDetectionModel", "predict", f"{WRAPPERS}:wrap_predict", "RT-DETR's own predict"),
    Hook(f"{TASKS}:_SafeLoad", "loading", "revcol.ultralytics.safe_load:wrap_safe_loading",
         "RevCol classes allowed only inside Ultralytics' restricted load", static=True),
    Hook("ultralytics.engine.model:Model", "_smart_load", f"{TRAINERS}:wrap_smart_load",
         "a RevCol model trains with a revcol.trainers class, which a DDP worker imports"),
    Hook(TRAINER, "build_optimizer", f"{TRAINERS}:wrap_build_optimizer",
         "no weight decay on alphas and gammas; the layer-wise lr decay (param groups added to its optimizer)"),
    Hook(TRAINER, "get_model", f"{TRAINERS}:wrap_get_model",
         "a model about to get trained weights is built without its pretrained file",
         subclasses="ultralytics.models"),
    Hook(TRAINER, "save_model", f"{TRAINERS}:wrap_save_model", "last.pt, best.pt, epoch<N>.pt written atomically"),
    Hook("ultralytics.engine.trainer", "strip_optimizer", f"{TRAINERS}:wrap_strip_optimizer",
         "the final rewrite of last.pt and best.pt atomic too"),
    Hook("ultralytics.utils.dist", "generate_ddp_file", f"{TRAINERS}:wrap_generate_ddp_file",
         "the DDP worker file of a RevCol run imports revcol first"),
    Hook("ultralytics.utils.checks", "check_font", f"{OURS}:local_font",
         "no font download: a font already there or matplotlib's", group=OFFLINE),
    Hook("ultralytics.data.utils", "check_font", f"{OURS}:local_font", "its own reference to check_font",
         group=OFFLINE, optional=True),
    Hook("ultralytics.utils.plotting", "check_font", f"{OURS}:local_font", "its own reference to check_font",
         group=OFFLINE, optional=True),
    Hook("ultralytics.utils.checks", "ONLINE", f"{OURS}:false", "no PyPI update check", group=OFFLINE,
         guard=False),
    Hook("ultralytics.utils.events:events", "enabled", f"{OURS}:false", "no usage analytics", group=OFFLINE,
         guard=False),
    Hook("ultralytics.cfg", "ARGV", f"{OURS}:yolo_argv", "the command line Ultralytics' CLI reads", group=CLI,
         guard=False),
    Hook("ultralytics.engine.model", "ARGV", f"{OURS}:yolo_argv", "its copy: `yolo predict` saves by default",
         group=CLI, guard=False),
    Hook(TRAINER, "last", f"{TRAINERS}:atomic_path", "save_model writes last.pt through it: atomically",
         group=SAVE, guard=False, instance=True),
    Hook(TRAINER, "best", f"{TRAINERS}:atomic_path", "the same for best.pt", group=SAVE, guard=False, instance=True),
    Hook(TRAINER, "wdir", f"{TRAINERS}:atomic_path", "the same for the save_period files, wdir / epoch<N>.pt",
         group=SAVE, guard=False, instance=True),
    Hook("ultralytics.nn.modules.head:RTDETRDecoder", "num_denoising", f"{OURS}:given",
         "the demo's short CPU training: fewer denoising queries", group=DENOISING, guard=False, instance=True),
)  # fmt: skip


# --- replacements made here --------------------------------------------------------------------------------------


def backbone_class(original: Any) -> type:
    """The RevCol layer class, under the name an expanded YAML row gives it."""
    from revcol.ultralytics.backbone import RevColBackbone

    return RevColBackbone


def false(original: Any) -> bool:
    """False, whatever the flag was."""
    return False


def given(original: Any, *, value: Any) -> Any:
    """The ``value`` the group was applied with."""
    return value


def yolo_argv(original: Any, *, args: tuple[str, ...]) -> list[str]:
    """``["yolo", *args]``: seen from Ultralytics, the ``revcol`` command is ``yolo`` with the same arguments."""
    return ["yolo", *args]


def fallback_font() -> Path | None:
    """A TrueType font that is already on disk: the DejaVu Sans shipped inside matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.is_file() else None


def local_font(check_font: Callable) -> Callable:
    """``check_font`` that answers a font already in Ultralytics' settings folder, else matplotlib's, never fetching.

    Answered here, not by calling the original: some releases cache its answers, so a font put there after an
    earlier miss would not be seen.
    """
    from ultralytics.utils import checks

    @functools.wraps(check_font)
    def wrapper(font: str = "Arial.ttf"):
        local = checks.USER_CONFIG_DIR / Path(font).name
        return local if local.is_file() else fallback_font()

    return wrapper


# --- the mechanism -----------------------------------------------------------------------------------------------


def resolve(path: str) -> Any:
    """The object an import path ``"module"`` or ``"module:attr.attr"`` names."""
    module, _, attrs = path.partition(":")
    obj = importlib.import_module(module)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj


def subclasses_in(cls: type, package: str) -> list[type]:
    """``cls`` and its subclasses defined in ``package`` (imported first, so it has defined them), by name."""
    importlib.import_module(package)
    root = package.split(".")[0]
    found, pending = [], [cls]
    while pending:
        candidate = pending.pop()
        if candidate not in found and (candidate is cls or candidate.__module__.split(".")[0] == root):
            found.append(candidate)
            pending += candidate.__subclasses__()
    return sorted(found, key=lambda c: c.__qualname__)


def owners(hook: Hook, instance: Any = None) -> list[Any]:
    """The objects whose attribute ``hook.name`` is replaced: the owner, and with ``subclasses`` its subclasses;
    for an ``instance`` hook, ``instance`` (an instance of the owner)."""
    owner = resolve(hook.owner)
    if hook.instance:
        if not isinstance(instance, owner):
            raise TypeError(f"revcol hook {hook.owner}.{hook.name} applies to an instance of it, not {instance!r}")
        return [instance]
    if hook.subclasses:
        return [cls for cls in subclasses_in(owner, hook.subclasses) if hook.name in vars(cls)]
    return [owner] if not hook.optional or hook.name in vars(owner) else []


class _Switch:
    """On while the application that made a set of guarded replacements is in effect."""

    on = True


_MISSING = object()


@dataclass
class _Applied:
    owner: Any
    name: str
    original: Any  # owner.__dict__[name] before, or _MISSING
    installed: Any


@dataclass
class _Group:
    switch: _Switch = field(default_factory=_Switch)
    applied: list[_Applied] = field(default_factory=list)
    users: int = 0
    context: dict = field(default_factory=dict)


_lock = threading.RLock()
_active: dict[Hashable, _Group] = {}


def _key(group_name: str, context: Mapping[str, Any]) -> Hashable:
    """A group of instance attributes is applied once per instance, any other group once per process."""
    return (group_name, id(context["instance"])) if "instance" in context else group_name


def _guarded(switch: _Switch, original: Callable, replacement: Callable) -> Callable:
    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (replacement if switch.on else original)(*args, **kwargs)

    return call


def _apply(group_name: str, context: Mapping[str, Any]) -> _Group:
    group = _Group(context=dict(context))
    arguments = {name: value for name, value in context.items() if name != "instance"}
    try:
        for hook in (h for h in HOOKS if h.group == group_name):
            make = resolve(hook.make)
            for owner in owners(hook, context.get("instance")):
                original = getattr(owner, hook.name) if hook.guard else getattr(owner, hook.name, None)
                value = make(original, **arguments)
                if hook.guard:
                    value = _guarded(group.switch, original, value)
                if hook.static:
                    value = staticmethod(value)
                group.applied.append(_Applied(owner, hook.name, vars(owner).get(hook.name, _MISSING), value))
                setattr(owner, hook.name, value)
    except BaseException:
        _restore(group)
        raise
    return group


def _restore(group: _Group) -> None:
    group.switch.on = False
    while group.applied:
        item = group.applied.pop()
        if vars(item.owner).get(item.name, _MISSING) is not item.installed:
            continue  # someone replaced it after us: theirs stays, and our guarded wrapper inside passes through
        if item.original is _MISSING:
            delattr(item.owner, item.name)
        else:
            setattr(item.owner, item.name, item.original)


def apply(group_name: str = REGISTER, **context: Any) -> None:
    """Put ``group_name``'s hooks in place; nothing happens if they already are."""
    with _lock:
        if group_name not in _active:
            _active[group_name] = _apply(group_name, context)


def restore(group_name: str = REGISTER) -> None:
    """Put back what ``apply(group_name)`` replaced, each attribute by identity; nothing happens if not applied."""
    with _lock:
        group = _active.pop(group_name, None)
        if group is not None:
            _restore(group)


def is_applied(group_name: str = REGISTER) -> bool:
    """Whether the process-wide group ``group_name`` is in effect."""
    with _lock:
        return group_name in _active


@contextlib.contextmanager
def applied(group_name: str, **context: Any) -> Iterator[None]:
    """``group_name``'s hooks for the duration of the block. Overlapping blocks (any thread) share one application,
    so they must agree on ``context``; the first to enter applies it, the last to leave restores it. A group of
    instance attributes takes the instance as ``instance=``; blocks on different instances are independent."""
    key = _key(group_name, context)
    with _lock:
        group = _active.get(key)
        if group is None:
            group = _active[key] = _apply(group_name, context)
        elif group.context != context:
            raise RuntimeError(f"revcol hooks {group_name!r} are in effect with {group.context}, not {context}")
        group.users += 1
    try:
        yield
    finally:
        with _lock:
            group.users -= 1
            if group.users == 0 and _active.get(key) is group:
                del _active[key]
                _restore(group)


def register() -> None:
    """Make the RevCol backbones nameable in Ultralytics YAMLs and loadable by its safe load. Idempotent, thread-safe.

    Refuses an Ultralytics outside the range revcol's package metadata declares. torch's weights-only allow-list is
    left as it is: the RevCol classes are allowed only while Ultralytics' restricted load (``ULTRALYTICS_SAFE_LOAD``)
    runs, see ``revcol.ultralytics.safe_load.checkpoint_classes_allowed``.
    """
    with _lock:
        if is_applied(REGISTER):
            return
        import ultralytics
        from ultralytics.utils.checks import check_version

        from revcol.ultralytics.releases import supported_ultralytics

        supported = supported_ultralytics()
        if not check_version(ultralytics.__version__, supported):
            raise RuntimeError(
                f"revcol supports ultralytics {supported}; found {ultralytics.__version__}. "
                f"Install a supported release: pip install 'ultralytics{supported}'"
            )
        apply(REGISTER)


def unregister() -> None:
    """Undo ``register()``: each attribute it set gets its previous value back (by identity). Thread-safe.

    An attribute someone else replaced after ``register()`` (say, by wrapping the RevCol wrapper) keeps their
    value; the RevCol wrapper inside it then passes calls through unchanged.
    """
    restore(REGISTER)


def is_registered() -> bool:
    """Whether ``register()`` is in effect."""
    return is_applied(REGISTER)
