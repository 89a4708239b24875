"""Trainers for models with a RevCol backbone.

They live in this package so that Ultralytics' DDP workers, which rebuild the trainer from its
import path in a fresh process, import ``revcol`` (and so register the backbones) there too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import yaml_model_load

from revcol.integration import without_pretrained
from revcol.model import ConvNextBlock, SubNet


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """RevCol parameters that weight decay must not shrink: column alphas and layer-scale gammas."""
    params = []
    for module in model.modules():
        if isinstance(module, SubNet):
            params += module.alphas
        elif isinstance(module, ConvNextBlock):
            params.append(module.gamma)
    return params


def exclude_from_weight_decay(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Move ``params`` out of every decaying param group into a decay-free copy of that group."""
    moving = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay") or not any(id(p) in moving for p in group["params"]):
            continue
        taken = [p for p in group["params"] if id(p) in moving]
        group["params"] = [p for p in group["params"] if id(p) not in moving]
        settings = {k: v for k, v in group.items() if k != "params"}
        settings.update(weight_decay=0.0, param_group="revcol_no_decay")
        if "use_muon" in settings:
            settings["use_muon"] = False
        optimizer.add_param_group({"params": taken, **settings})


class RevColTrainerMixin:
    """Ultralytics' trainer with RevCol alphas and gammas excluded from weight decay.

    A model built to receive trained weights (fine-tuning or resuming from a ``.pt``) skips the ``pretrained``
    file its YAML names: those weights would be overwritten at once, and the file may be long gone.
    """

    def get_model(self, cfg=None, weights=None, verbose=True):
        if weights and cfg is not None:
            cfg = without_pretrained(cfg if isinstance(cfg, dict) else yaml_model_load(cfg))
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

    def build_optimizer(self, model, *args, **kwargs):
        optimizer = super().build_optimizer(model, *args, **kwargs)
        exclude_from_weight_decay(optimizer, no_decay_parameters(model))
        return optimizer


class RevColDetectionTrainer(RevColTrainerMixin, DetectionTrainer):
    """YOLO detection trainer for RevCol models."""


class RevColRTDETRTrainer(RevColTrainerMixin, RTDETRTrainer):
    """RT-DETR trainer for RevCol models."""


TRAINERS: dict[type, type] = {
    DetectionTrainer: RevColDetectionTrainer,
    RTDETRTrainer: RevColRTDETRTrainer,
}


def uses_revcol(model: object) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, SubNet) for m in model.modules())


def wrap_smart_load(smart_load: Callable) -> Callable:
    """``Model._smart_load`` that answers RevCol trainers for models with a RevCol backbone."""

    @functools.wraps(smart_load)
    def wrapper(self, key: str):
        loaded = smart_load(self, key)
        if key == "trainer" and uses_revcol(getattr(self, "model", None)):
            return TRAINERS.get(loaded, loaded)
        return loaded

    return wrapper
