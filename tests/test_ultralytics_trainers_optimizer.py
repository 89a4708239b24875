"""The optimizer every Ultralytics trainer builds for a RevCol model (``revcol.ultralytics.trainers``): column alphas,
layer-scale gammas and norms out of weight decay, and the authors' layer-wise lr decay (option ``lr_decay``). One
short real training (2 epochs on 8 generated images) checks that the lr ratios survive Ultralytics' warmup and
schedule.
"""

from __future__ import annotations

import pytest
import torch
from helpers.plugin import TASK_TRAINERS, UserDetectionTrainer, UserSegmentationTrainer, bare_trainer, tiny_rtdetr
from helpers.yamls import IMGSZ, backbone_with, write_yaml
from ultralytics import YOLO

from revcol import ConfigError
from revcol.core.param_groups import lr_scale, num_layers
from revcol.demo import generate_dataset
from revcol.ultralytics.trainers import RevColDetectionTrainer, exclude_from_weight_decay, no_decay_parameters


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_alphas_and_gammas_get_no_weight_decay(optimizer):
    model = tiny_rtdetr()
    trainer = object.__new__(RevColDetectionTrainer)
    opt = trainer.build_optimizer(model, name=optimizer, lr=0.01, momentum=0.9, decay=5e-4)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in model.parameters())
    backbone = model.model[0]
    special = no_decay_parameters(model)
    assert len(special) == 4 * 2 + 4 * 2  # 4 alphas per column + one gamma per block (4 blocks per column)
    norms = [m.weight for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    for p in special + norms:
        assert decay_of[id(p)] == 0.0
    assert decay_of[id(backbone.stem[0].weight)] == 5e-4


def test_exclude_from_weight_decay_splits_only_decaying_groups():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b], "weight_decay": 0.1}, {"params": [c], "weight_decay": 0.0}], lr=1)
    exclude_from_weight_decay(opt, [b, c])
    groups = [([id(p) for p in g["params"]], g["weight_decay"]) for g in opt.param_groups]
    assert groups == [([id(a)], 0.1), ([id(c)], 0.0), ([id(b)], 0.0)]


def test_lr_decay_from_the_yaml_line_and_as_an_attribute(tmp_path):
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.7"))).model
    assert model.model[0].lr_decay == 0.7
    backbone = model.model[0]
    backbone.lr_decay = 0.5  # set from Python after building: the trainer reads it when it builds the optimizer
    scales = _scales_of(bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="SGD", lr=1.0), model)
    assert scales[id(backbone.stem[0].weight)] == 0.5**6  # 2 columns, 4 rows: num_layers 7
    backbone.lr_decay = 2.0
    with pytest.raises(ConfigError, match="lr_decay"):
        bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="SGD", lr=1.0)


def _scales_of(optimizer, model) -> dict[int, float]:
    """``id(parameter) -> its group's lr / base lr`` (base: the lr of the head's weight group)."""
    head = model.model[-1].cv2[0][0].conv.weight
    head_lr = next(g["lr"] for g in optimizer.param_groups for p in g["params"] if p is head)
    return {id(p): g["lr"] / head_lr for g in optimizer.param_groups for p in g["params"]}


def test_build_optimizer_scales_every_backbone_parameter_by_its_depth(tmp_path):
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.5"))).model
    optimizer = bare_trainer(RevColDetectionTrainer).build_optimizer(model, name="AdamW", lr=0.01, decay=5e-4)
    scales, backbone = _scales_of(optimizer, model), model.model[0]
    assert len(scales) == sum(1 for _ in model.parameters())
    for name, p in backbone.named_parameters():
        assert scales[id(p)] == pytest.approx(lr_scale(name, [1] * 4, 2, 0.5), rel=1e-12), name
    head = [p for i, m in enumerate(model.model) if i >= 5 for p in m.parameters()]
    assert head and all(scales[id(p)] == 1.0 for p in head)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == 0.0 for p in no_decay_parameters(model))
    assert decay[id(backbone.stem[0].weight)] == 5e-4  # the split keeps each group's weight decay


TRAINER_CASES = [*TASK_TRAINERS.items(), ("detect", UserDetectionTrainer), ("segment", UserSegmentationTrainer)]


@pytest.mark.parametrize(("task", "cls"), TRAINER_CASES, ids=[c.__name__ for _, c in TRAINER_CASES])
def test_every_trainer_exempts_alphas_gammas_and_norms_and_decays_lr(task, cls, tmp_path):
    yaml = write_yaml(tmp_path, task, backbone_with("lr_decay: 0.5"))
    model = bare_trainer(cls).get_model(cfg=yaml, verbose=False)
    optimizer = bare_trainer(cls).build_optimizer(model, name="SGD", lr=0.1, momentum=0.9, decay=5e-4)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    backbone = model.model[0]
    norms = [m.weight for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    special = no_decay_parameters(model)
    assert len(special) == 4 * 2 + 4 * 2 and norms
    assert all(groups[id(p)]["weight_decay"] == 0.0 for p in special + norms)
    stem, head = groups[id(backbone.stem[0].weight)], groups[id(next(model.model[-1].parameters()))]
    assert stem["weight_decay"] == 5e-4
    assert stem["lr"] == pytest.approx(0.1 * 0.5**6) and head["lr"] == 0.1


LR_LOG: list[dict] = []  # per training batch: the epoch and each group's lr, initial_lr, kind and parameter ids


def _log_lrs(trainer):
    groups = [
        (g["lr"], g["initial_lr"], g["param_group"], {id(p) for p in g["params"]})
        for g in trainer.optimizer.param_groups
    ]
    LR_LOG.append({"epoch": trainer.epoch, "groups": groups, "model": trainer.model})


@pytest.mark.parametrize("warmup_bias_lr", [0.0, 0.1])
def test_lr_ratios_survive_warmup_and_schedule_in_a_real_training(tmp_path, warmup_bias_lr):
    """2 epochs, 2 batches each, 1 warmup epoch; a user trainer, so the hooks (not a RevCol class) do the work.

    Ultralytics starts every bias group's warmup at the same ``warmup_bias_lr``; with 0 (the recipe, and what
    ``optimizer=auto`` sets) every group keeps its ratio throughout, otherwise the bias groups only after warmup.
    """
    data = generate_dataset(tmp_path / "data", n_train=8, n_val=2, imgsz=IMGSZ, seed=0)
    model = YOLO(write_yaml(tmp_path, "detect", backbone_with("lr_decay: 0.5")))
    model.add_callback("on_train_batch_end", _log_lrs)
    LR_LOG.clear()
    model.train(
        data=str(data), epochs=2, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False, amp=False,
        project=str(tmp_path / "runs"), name="lr", exist_ok=True, verbose=False, val=False, nbs=4,
        optimizer="AdamW", lr0=0.002, lrf=0.5, warmup_epochs=1, warmup_bias_lr=warmup_bias_lr,
        trainer=UserDetectionTrainer,
    )  # fmt: skip
    assert len(LR_LOG) == 4 and LR_LOG[0]["epoch"] == 0 and LR_LOG[-1]["epoch"] == 1
    trained = LR_LOG[0]["model"]
    stem, head = id(trained.model[0].stem[0].weight), id(trained.model[-1].cv2[0][0].conv.weight)
    expected = 0.5 ** (num_layers([1] * 4, 2) - 1)
    factors = []
    for entry in LR_LOG:
        # every group follows the same warmup / schedule factor, so all ratios (not only the stem's) hold
        compared = [
            (lr, initial)
            for lr, initial, kind, ids in entry["groups"]
            if ids and (kind != "bias" or not warmup_bias_lr)
        ]
        group_factors = {round(lr / initial, 12) for lr, initial in compared}
        assert len(compared) > 10 and len(group_factors) == 1, group_factors
        factors.append(group_factors.pop())
        lr_of = {pid: lr for lr, _, _, ids in entry["groups"] for pid in ids}
        if factors[-1]:  # warmup starts every lr at 0
            assert lr_of[stem] / lr_of[head] == pytest.approx(expected, rel=1e-9)
    # batch 1 is in warmup (lrs still rising) in both releases; warmup and the schedule both moved the lrs
    assert 0 == factors[0] < factors[1] < max(factors) and len(set(factors)) >= 3, factors
