"""What every Ultralytics trainer does differently for a model with a RevCol backbone (``docs/design.md``).

``revcol.ultralytics.hooks`` installs the wrappers below on Ultralytics' trainers, so Ultralytics' own, the RevCol
ones and any user subclass of them

* keep column alphas, layer-scale gammas and norms out of weight decay,
* apply the backbone's layer-wise lr decay (option ``lr_decay``, see ``revcol.core.param_groups``),
* build a model that is about to receive trained weights without its ``pretrained`` option, and
* write ``last.pt`` and ``best.pt`` atomically.

For models with a RevCol backbone ``Model._smart_load`` answers a RevCol trainer class: one per Ultralytics trainer
class (``RevColDetectionTrainer`` for ``DetectionTrainer``, ``RevColDepthTrainer`` for ``DepthTrainer``, ...), made
here from the trainers Ultralytics defines, so a task it adds is covered without a list to update. They add no
behaviour; they give the trainer an import path inside this package, so an Ultralytics DDP worker, which imports
the trainer class (8.4.67: ``from revcol.trainers import ...``; 8.4.190: by unpickling it), imports ``revcol``
and so registers the backbones and these hooks before it builds the model or the optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.nn.tasks import yaml_model_load
from ultralytics.utils import LOGGER

from revcol._atomic import replace_atomically, write_atomically
from revcol.core.network import FullNet, find_backbones
from revcol.core.param_groups import check_lr_decay, exempt_from_weight_decay, lr_scale
from revcol.ultralytics import hooks
from revcol.ultralytics.releases import check_heads
from revcol.ultralytics.yaml_rows import names_revcol_backbone, without_pretrained

# Importing it imports every task package, and with them every trainer class Ultralytics defines.
TRAINER_PACKAGE = "ultralytics.models"


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """RevCol parameters that weight decay must not shrink: column alphas and layer-scale gammas.

    Norm weights need nothing here: Ultralytics already puts every ``*Norm*`` module's weight in its no-decay group.
    """
    return [
        p
        for backbone in find_backbones(model)
        for name, p in backbone.named_parameters()
        if exempt_from_weight_decay(name)  # the rule timm's RevColClassifier.no_weight_decay follows too
    ]


def exclude_from_weight_decay(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Move ``params`` out of every decaying param group into a decay-free copy of that group."""
    moving = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay") or not any(id(p) in moving for p in group["params"]):
            continue
        taken = [p for p in group["params"] if id(p) in moving]
        group["params"] = [p for p in group["params"] if id(p) not in moving]
        settings = {k: v for k, v in group.items() if k != "params"}
        # Keys of Ultralytics' groups (the build_optimizer hook's contract): its trainer sets the weight decay of the
        # "weight" and "muon" groups again after an OOM retry, and MuSGD orthogonalises "use_muon" groups.
        settings.update(weight_decay=0.0, param_group="revcol_no_decay")
        if "use_muon" in settings:
            settings["use_muon"] = False
        optimizer.add_param_group({"params": taken, **settings})


def lr_scales(model: nn.Module) -> dict[int, float]:
    """``id(parameter) -> lr factor`` for the backbone's parameters under its ``lr_decay``; empty without one.

    Parameters not in the map (everything outside the backbone) keep the base lr.
    """
    backbone = next((m for m in model.modules() if isinstance(m, FullNet)), None)
    rate = check_lr_decay(getattr(backbone, "lr_decay", None))
    if rate is None or rate == 1:
        return {}
    layers, columns = list(backbone.layers), backbone.num_subnet
    return {id(p): lr_scale(name, layers, columns, rate) for name, p in backbone.named_parameters()}


def scale_learning_rates(optimizer: torch.optim.Optimizer, scales: Mapping[int, float]) -> None:
    """Split every param group by lr factor: the base-lr parameters stay, the others go to scaled copies.

    A copy's ``lr`` (and ``initial_lr``, if a scheduler set one) carries its factor, recorded as ``lr_scale``.
    Ultralytics' scheduler and warmup set each group's lr from its own ``initial_lr``, which torch's LambdaLR takes
    from the group's lr when it is built, so the ratios between groups survive both.
    """
    for group in list(optimizer.param_groups):
        by_scale: dict[float, list[nn.Parameter]] = defaultdict(list)
        for p in group["params"]:
            by_scale[scales.get(id(p), 1.0)].append(p)
        group["params"] = by_scale.pop(1.0, [])
        settings = {k: v for k, v in group.items() if k != "params"}
        for scale, params in sorted(by_scale.items(), reverse=True):
            scaled = {k: settings[k] * scale for k in ("lr", "initial_lr") if k in settings}
            optimizer.add_param_group({**settings, **scaled, "params": params, "lr_scale": scale})


def configure_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """The RevCol param groups on top of Ultralytics' own: no decay for alphas and gammas, then the lr decay."""
    exclude_from_weight_decay(optimizer, no_decay_parameters(model))
    scale_learning_rates(optimizer, lr_scales(model))


def uses_revcol(model: object) -> bool:
    """Whether ``model`` is a module holding a RevCol backbone."""
    return bool(find_backbones(model))


def wrap_build_optimizer(build_optimizer: Callable) -> Callable:
    """``BaseTrainer.build_optimizer`` that adds the RevCol param groups for a model with a RevCol backbone."""

    @functools.wraps(build_optimizer)
    def wrapper(self, model, *args, **kwargs):
        optimizer = build_optimizer(self, model, *args, **kwargs)
        if uses_revcol(model):
            configure_optimizer(optimizer, model)
        return optimizer

    return wrapper


def wrap_get_model(get_model: Callable) -> Callable:
    """A task trainer's ``get_model`` that skips the ``pretrained`` file of a model about to receive trained weights.

    Fine-tuning or resuming from a ``.pt`` overwrites those weights at once, and the file may be long gone.
    """

    @functools.wraps(get_model)
    def wrapper(self, cfg=None, weights=None, verbose=True):
        if weights and cfg is not None:
            cfg = _without_pretrained(cfg)
        return get_model(self, cfg=cfg, weights=weights, verbose=verbose)

    return wrapper


def _without_pretrained(cfg: dict | str) -> dict | str:
    """``cfg`` itself unless it names a RevCol ``pretrained`` file, else its dict without that option."""
    d = cfg if isinstance(cfg, dict) else yaml_model_load(cfg)
    stripped = without_pretrained(d)
    return cfg if stripped == d else stripped


class RevColTrainerMixin:
    """Marks the RevCol trainer classes; the behaviour itself comes from the hooks, for every trainer alike."""


def ultralytics_trainers() -> list[type]:
    """Every trainer class Ultralytics defines: ``BaseTrainer`` and its subclasses in ``ultralytics``."""
    return hooks.subclasses_in(BaseTrainer, TRAINER_PACKAGE)


_made: dict[type, type] = {}
_made_lock = threading.Lock()


def revcol_trainer(trainer: type) -> type:
    """The RevCol trainer class of Ultralytics trainer class ``trainer``: ``revcol.trainers.RevCol<name>``."""
    with _made_lock:
        if trainer not in _made:
            name = f"RevCol{trainer.__name__}"
            doc = f"{trainer.__name__} for models with a RevCol backbone (importable as revcol.trainers.{name})."
            made = type(name, (RevColTrainerMixin, trainer), {"__module__": __name__, "__doc__": doc})
            made.__qualname__ = name
            _made[trainer] = made
            globals()[name] = made
        return _made[trainer]


TRAINERS: dict[type, type] = {cls: revcol_trainer(cls) for cls in ultralytics_trainers() if cls is not BaseTrainer}


def __getattr__(name: str) -> type:
    """``RevCol<name>`` of an Ultralytics trainer defined after this module was imported (a DDP worker asks so)."""
    if name.startswith("RevCol"):
        for cls in ultralytics_trainers():
            if f"RevCol{cls.__name__}" == name and cls is not BaseTrainer:
                return revcol_trainer(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


DDP_PRELUDE = "import revcol  # noqa: F401  (added by revcol: registers the RevCol backbones in this DDP worker)\n"


def wrap_generate_ddp_file(generate_ddp_file: Callable) -> Callable:
    """Ultralytics' DDP worker file, made to ``import revcol`` first when the run trains a RevCol model.

    A worker is a fresh interpreter that imports the trainer's module and parses the model YAML: a user's trainer
    module need not import revcol, and a YAML path imports nothing, so without this line the backbone is unknown.
    """

    @functools.wraps(generate_ddp_file)
    def wrapper(trainer, *args, **kwargs):
        file = generate_ddp_file(trainer, *args, **kwargs)
        if trains_revcol(trainer):
            path = Path(file)
            path.write_text(DDP_PRELUDE + path.read_text())
        return file

    return wrapper


def trains_revcol(trainer: BaseTrainer) -> bool:
    """Whether ``trainer``'s model (a module, or a model YAML it is about to build) has a RevCol backbone."""
    model = getattr(trainer, "model", None)
    if isinstance(model, (str, Path)) and str(model).endswith((".yaml", ".yml")):
        return names_revcol_backbone(yaml_model_load(model))
    return uses_revcol(model)


def wrap_smart_load(smart_load: Callable) -> Callable:
    """``Model._smart_load`` that answers RevCol trainers for models with a RevCol backbone.

    A RevCol model YAML whose head this Ultralytics lacks (so it guessed no task) gets the error naming the release
    that has the head, instead of "does not support 'wrapper' mode for 'None' task".
    """

    @functools.wraps(smart_load)
    def wrapper(self, key: str):
        try:
            loaded = smart_load(self, key)
        except NotImplementedError:
            cfg = getattr(self, "cfg", None)
            if key == "model" and isinstance(cfg, (str, Path)) and str(cfg).endswith((".yaml", ".yml")):
                d = yaml_model_load(cfg)
                if names_revcol_backbone(d):
                    check_heads(d)
            raise
        if key == "trainer" and uses_revcol(getattr(self, "model", None)):
            return revcol_trainer(loaded) if _is_ultralytics_trainer(loaded) else loaded
        return loaded

    return wrapper


def _is_ultralytics_trainer(cls: Any) -> bool:
    return (
        isinstance(cls, type)
        and issubclass(cls, BaseTrainer)
        and cls is not BaseTrainer
        and cls.__module__.split(".")[0] == "ultralytics"
    )


# The trainer's paths that save_model writes to (or under): the ``save`` group of revcol.ultralytics.hooks.HOOKS.
ATOMIC_TRAINER_PATHS = tuple(hook.name for hook in hooks.HOOKS if hook.group == hooks.SAVE)


def wrap_save_model(save_model: Callable) -> Callable:
    """``BaseTrainer.save_model`` that, for a RevCol model, writes ``last.pt``, ``best.pt``, ``epoch<N>.pt`` atomically.

    Ultralytics writes them with ``Path.write_bytes`` in place, so a kill during the write leaves a truncated file.
    For the duration of the call the ``save`` group of the hook table makes the trainer's ``last``, ``best`` and
    ``wdir`` (whose children are the ``save_period`` files) ``AtomicPath``s, whose ``write_bytes`` writes a temporary
    file in the same folder, syncs it and renames it over the target, so the previous file stays whole until the
    new one is complete.
    """

    @functools.wraps(save_model)
    def wrapper(self, *args, **kwargs):
        if not uses_revcol(getattr(self, "model", None)):
            return save_model(self, *args, **kwargs)
        with hooks.applied(hooks.SAVE, instance=self):
            return save_model(self, *args, **kwargs)

    return wrapper


def atomic_path(path: Path) -> AtomicPath:
    """``path`` as an ``AtomicPath``: the replacement the ``save`` hooks install for the trainer's paths."""
    return AtomicPath(path)


class AtomicPath(type(Path())):
    """A path whose ``write_bytes`` replaces the file atomically: temporary file, fsync, rename, fsync the folder.

    Paths joined onto it (``wdir / "epoch3.pt"``) are ``AtomicPath``s too: pathlib builds children of its own class.
    """

    def write_bytes(self, data: bytes) -> int:
        return write_atomically(Path(self), data)


def wrap_strip_optimizer(strip_optimizer: Callable) -> Callable:
    """Ultralytics' last rewrite of ``last.pt`` and ``best.pt`` (without the optimizer state), made atomic too.

    At the end of training Ultralytics saves each file again in place, with ``torch.save``; a kill then would
    truncate the checkpoint that every earlier save kept whole. The call does not know the model, so while revcol is
    registered this final rewrite is atomic for every model (the files' contents are Ultralytics' own).
    """

    @functools.wraps(strip_optimizer)
    def wrapper(f="best.pt", s="", *args, **kwargs):
        if s:  # written to another file: f stays as it was
            return strip_optimizer(f, s, *args, **kwargs)
        result = []

        def write(temporary: Path) -> None:
            # Its message would name the temporary file ("saved as .last.pt.<token>.part"): the one logged names f.
            with _unlogged(str(temporary)):
                result.append(strip_optimizer(f, str(temporary), *args, **kwargs))

        replace_atomically(Path(f), write)
        LOGGER.info(f"Optimizer stripped from {f}, {os.path.getsize(f) / 1e6:.1f}MB")  # as Ultralytics says it in place
        return result[0]

    return wrapper


@contextlib.contextmanager
def _unlogged(text: str) -> Iterator[None]:
    """Ultralytics' log records that mention ``text`` dropped for the duration of the block."""

    def kept(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    LOGGER.addFilter(kept)
    try:
        yield
    finally:
        LOGGER.removeFilter(kept)
