"""RevCol in Ultralytics: the wrappers of its functions and the folders that replace those of its settings.

The YAML row that names a backbone is expanded by ``revcol.ultralytics.yaml_rows``; ``revcol.ultralytics.hooks``
installs what is below (``register()``). Nothing here patches anything by itself (``docs/design.md``, section
"YAML contract"). One change outlives the process, on purpose: ``own_settings`` puts right the folders that
Ultralytics' settings file took from a git checkout that is not Ultralytics' (the file keeps them for every project)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from revcol.errors import ConfigError
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.releases import check_heads
from revcol.ultralytics.yaml_rows import (
    BACKBONE_LAYERS,
    CONFIG_DIR,
    expand_backbone,
    head_modules,
    names_revcol_backbone,
)

YAML_SUFFIXES = (".yaml", ".yml")


def wrap_parse_model(parse_model: Callable) -> Callable:
    """``parse_model`` on the expanded model dict (``yaml_rows.expand_backbone``)."""

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


def _model_dict(model: object) -> dict | None:
    """The model dict of ``model`` when it names a model YAML that can be found (a path or a shipped config), else
    None; Ultralytics' loader, so the dict is the one it builds from."""
    if not isinstance(model, (str, Path)) or Path(model).suffix.lower() not in YAML_SUFFIXES:
        return None
    from ultralytics.nn import tasks

    try:
        d = tasks.yaml_model_load(model)
    except FileNotFoundError:  # Ultralytics' own constructor says so
        return None
    return d if isinstance(d, dict) else None


def wrap_yolo_init(init: Callable) -> Callable:
    """``YOLO.__init__`` that builds a RevCol model YAML with an RT-DETR head as ``RTDETR``, whatever the file's name.

    Ultralytics tells RT-DETR from YOLO by the head for a checkpoint (``YOLO`` becomes ``RTDETR``) but by the file
    name for a YAML: its CLI builds ``RTDETR`` only for names containing "rtdetr", and ``YOLO`` guesses no task for
    an ``RTDETRDecoder`` head. Here a YAML becomes ``RTDETR`` the way such a checkpoint does.
    """

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        d = _model_dict(args[0] if args else kwargs.get("model"))
        if d is None or not names_revcol_backbone(d) or head_modules(d)[-1:] != ["RTDETRDecoder"]:
            return init(self, *args, **kwargs)
        from ultralytics import RTDETR

        built = RTDETR(args[0] if args else kwargs["model"])
        self.__class__, self.__dict__ = type(built), built.__dict__
        return None

    return wrapper


def wrap_guess_model_scale(guess_model_scale: Callable) -> Callable:
    """``guess_model_scale`` that, for a RevCol YAML whose file name names no scale, answers the YAML's own ``scale:``
    key, or its only scale when it has one.

    Ultralytics reads the scale from the file name alone (``yolo11n.yaml``) and replaces any ``scale:`` key with that;
    without one it assumes the first scale and warns, a warning that a name like ``rtdetr-revcol.yaml`` could never
    avoid.
    """

    @functools.wraps(guess_model_scale)
    def wrapper(model_path):
        guessed = guess_model_scale(model_path)
        if guessed or Path(str(model_path)).suffix.lower() not in YAML_SUFFIXES:
            return guessed
        return _declared_scale(model_path) or guessed

    return wrapper


def _declared_scale(path: str | Path) -> str | None:
    from ultralytics.nn import tasks
    from ultralytics.utils import YAML

    found = tasks.check_yaml(path, hard=False)
    d = YAML.load(found) if found else None
    if not isinstance(d, dict) or not names_revcol_backbone(d) or not isinstance(d.get("scales"), dict):
        return None
    scales, declared = d["scales"], d.get("scale")
    if declared is None:
        return next(iter(scales)) if len(scales) == 1 else None
    if declared not in scales:
        raise ConfigError(f"{path}: scale {declared!r} is not one of its scales: {', '.join(map(str, scales))}")
    return declared


# Ultralytics' pip-install defaults for the folders of its settings, relative: under the folder a command runs in.
WORKING_FOLDERS = {"runs_dir": "runs", "weights_dir": "weights", "datasets_dir": "datasets"}


def own_settings() -> dict:
    """Ultralytics' settings, with the folders it derived from a git checkout not its own set to ``WORKING_FOLDERS``.

    At its first import Ultralytics looks for a ``.git`` above its own package (not above the working folder) and,
    finding one, takes it for a clone of Ultralytics: the settings file it writes then keeps ``runs_dir`` and
    ``weights_dir`` inside that checkout and ``datasets_dir`` beside it, for every later project. With revcol's
    install (a virtual environment inside a clone of revcol) that checkout is revcol's. A folder that still has the
    value derived from it is set to the working-folder default, in the settings file too; one the user chose stays.
    """
    import ultralytics
    from ultralytics.utils import GIT, SETTINGS

    root = GIT.root
    if root is None or Path(ultralytics.__file__).resolve().parent.parent == root:
        return SETTINGS
    derived = {key: folder for key, folder in WORKING_FOLDERS.items() if SETTINGS.get(key) == SETTINGS.defaults[key]}
    if derived:
        SETTINGS.update(derived)
    return SETTINGS


def runs_dir(original: Path) -> Path:
    """``runs_dir`` of ``own_settings()``: where runs without an absolute ``project=`` go."""
    return Path(own_settings()["runs_dir"])


def datasets_dir(original: Path) -> Path:
    """``datasets_dir`` of ``own_settings()``: where relative dataset paths and downloaded datasets go."""
    return Path(own_settings()["datasets_dir"])


def weights_dir(original: Path) -> Path:
    """``weights_dir`` of ``own_settings()``: where Ultralytics' downloaded weights go."""
    return Path(own_settings()["weights_dir"])
