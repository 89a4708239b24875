"""The hook table and its mechanism (``revcol.ultralytics.hooks``): register and unregister, the scoped and the
per-instance groups, threads, and a wrapper someone else put on top of ours. Every attribute of Ultralytics compared
with the table, around a training, the command and the demo: ``test_hooks.py``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.plugin import rtdetr_dict
from helpers.yamls import TINY_OPTIONS, TINY_RTDETR_YAML, TINY_YOLO_YAML, without_revcol
from ultralytics.engine.model import Model
from ultralytics.nn import tasks

import revcol
from revcol.ultralytics import hooks, wrappers
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.yaml_rows import shipped_configs


def _targets(group: str = hooks.REGISTER) -> list[tuple[object, str]]:
    """``(owner, attribute)`` of every hook of ``group`` in revcol's one table, owners resolved as it resolves them."""
    return [(owner, hook.name) for hook in hooks.HOOKS if hook.group == group for owner in hooks.owners(hook)]


def _guarded_targets(group: str = hooks.REGISTER) -> list[tuple[object, str]]:
    return [(o, h.name) for h in hooks.HOOKS if h.group == group and h.guard for o in hooks.owners(h)]


def _unwrapped(value):
    """The callable a patched attribute calls: a wrapper's original (staticmethods unpacked)."""
    return getattr(value, "__func__", value).__wrapped__


@pytest.fixture
def unregistered():
    """The Ultralytics attributes as they are without revcol; revcol registered again afterwards."""
    revcol.unregister()
    try:
        targets = _targets()
        yield (
            {target: vars(target[0]).get(target[1], MISSING) for target in targets},
            {t: getattr(*t) for t in _guarded_targets()},
        )
    finally:
        revcol.unregister()
        revcol.register()


MISSING = object()


def _assert_pristine(originals):
    assert not revcol.is_registered() and "RevColBackbone" not in vars(tasks)
    for (owner, name), original in originals.items():
        assert vars(owner).get(name, MISSING) is original, name


def _assert_wrapped_once(bound):
    assert revcol.is_registered() and vars(tasks)["RevColBackbone"] is RevColBackbone
    for (owner, name), original in bound.items():
        assert _unwrapped(vars(owner)[name]) == original, name  # == : bound classmethods are new objects


def test_the_table_covers_every_attribute_revcol_wraps(unregistered):
    """The hand-checked minimum: the hooks the YAML, trainer, DDP and safe-load paths depend on are all in it."""
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import dist

    targets = set(_targets())
    assert {
        (tasks, "parse_model"), (tasks, "check_yaml"), (tasks, "RevColBackbone"), (tasks.BaseModel, "predict"),
        (tasks.RTDETRDetectionModel, "predict"), (Model, "_smart_load"), (tasks._SafeLoad, "loading"),
        (BaseTrainer, "build_optimizer"), (BaseTrainer, "save_model"), (DetectionTrainer, "get_model"),
        (dist, "generate_ddp_file"),
    } <= targets  # fmt: skip
    assert len(targets) == len(_targets())  # no attribute is replaced twice


def test_register_is_idempotent_and_unregister_restores_originals(unregistered):
    originals, bound = unregistered
    revcol.register()
    patched = {t: vars(t[0])[t[1]] for t in originals}
    revcol.register()
    assert {t: vars(t[0])[t[1]] for t in originals} == patched
    assert all(patched[t] is not originals[t] for t in originals)
    _assert_wrapped_once(bound)
    revcol.unregister()
    revcol.unregister()
    _assert_pristine(originals)
    with pytest.raises(KeyError):  # Ultralytics as before: the name is unknown to it
        tasks.RTDETRDetectionModel(rtdetr_dict("revcol_tiny"), verbose=False)


@pytest.mark.parametrize(("group", "context"), [(hooks.OFFLINE, {}), (hooks.CLI, {"args": ("val", "x=1")})])
def test_scoped_groups_apply_for_the_block_and_restore_exactly(group, context):
    targets = _targets(group)
    assert targets
    before = {t: vars(t[0]).get(t[1], MISSING) for t in targets}
    with hooks.applied(group, **context), hooks.applied(group, **context):  # nested: one application
        for hook in (h for h in hooks.HOOKS if h.group == group):
            for owner in hooks.owners(hook):
                now = vars(owner)[hook.name]
                if hook.guard:  # our wrapper, around what was there
                    assert now is not before[owner, hook.name] and now.__wrapped__ is before[owner, hook.name]
                else:
                    assert now == hooks.resolve(hook.make)(before[owner, hook.name], **context)
        with pytest.raises(RuntimeError, match="in effect"), hooks.applied(group, other=1):
            pass
    assert {t: vars(t[0]).get(t[1], MISSING) for t in targets} == before
    assert all(vars(t[0]).get(t[1], MISSING) is before[t] for t in targets)


class _SomeoneElses:
    """A class another library allowed for weights-only loading."""


def test_concurrent_register_and_unregister_leave_one_wrapper_and_others_globals(unregistered):
    originals, bound = unregistered
    torch_entries = set(torch.serialization.get_safe_globals())
    errors = []
    start = threading.Barrier(16)

    def churn(seed):
        try:
            start.wait()
            for step in range(40):
                (revcol.register if (seed + step) % 3 else revcol.unregister)()
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)

    with torch.serialization.safe_globals([_SomeoneElses]):
        threads = [threading.Thread(target=churn, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        revcol.register()
        _assert_wrapped_once(bound)
        revcol.unregister()
        _assert_pristine(originals)
        assert set(torch.serialization.get_safe_globals()) == torch_entries | {_SomeoneElses}


def test_unregister_keeps_a_wrapper_someone_else_put_on_top(unregistered):
    originals, _ = unregistered
    revcol.register()
    ours = tasks.parse_model
    calls = []

    def theirs(d, ch, verbose=True):
        calls.append(d)
        return ours(d, ch, verbose)

    tasks.parse_model = theirs
    try:
        revcol.unregister()
        assert tasks.parse_model is theirs
        with pytest.raises(KeyError):  # our wrapper inside theirs passes straight through now
            tasks.RTDETRDetectionModel(rtdetr_dict("revcol_tiny"), verbose=False)
        revcol.register()
        model = tasks.RTDETRDetectionModel(rtdetr_dict("revcol", TINY_OPTIONS), verbose=False)
        assert isinstance(model.model[0], RevColBackbone) and len(calls) == 2
    finally:
        revcol.unregister()
        tasks.parse_model = originals[tasks, "parse_model"]


def test_instance_groups_apply_to_one_trainer_and_restore_exactly(tmp_path):
    """The ``save`` group replaces attributes of the one trainer it is applied to, for the block only."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from revcol.ultralytics.trainers import ATOMIC_TRAINER_PATHS, AtomicPath

    names = [hook.name for hook in hooks.HOOKS if hook.group == hooks.SAVE]
    assert sorted(names) == ["best", "last", "wdir"] and all(h.instance for h in hooks.HOOKS if h.group == hooks.SAVE)
    assert tuple(names) == ATOMIC_TRAINER_PATHS
    first, second = object.__new__(DetectionTrainer), object.__new__(DetectionTrainer)
    for trainer in (first, second):
        trainer.wdir = tmp_path / "weights"
        trainer.last, trainer.best = trainer.wdir / "last.pt", trainer.wdir / "best.pt"
    before = {id(trainer): dict(vars(trainer)) for trainer in (first, second)}
    with hooks.applied(hooks.SAVE, instance=first):
        assert all(type(getattr(first, name)) is AtomicPath for name in names)
        assert all(getattr(first, name) == before[id(first)][name] for name in names)  # the same paths
        assert type(first.wdir / "epoch3.pt") is AtomicPath  # the save_period files too
        assert vars(second) == before[id(second)] and "last" not in vars(DetectionTrainer)  # that trainer only
        with hooks.applied(hooks.SAVE, instance=second), hooks.applied(hooks.SAVE, instance=first):
            assert type(second.last) is AtomicPath and type(first.last) is AtomicPath
        assert all(vars(second)[name] is before[id(second)][name] for name in names)
        assert type(first.best) is AtomicPath  # its own block is still open
    for trainer in (first, second):
        assert all(vars(trainer)[name] is before[id(trainer)][name] for name in names)
    with pytest.raises(TypeError, match=r"applies to an instance of it"), hooks.applied(hooks.SAVE, instance=object()):
        pass


def test_a_revcol_yaml_with_an_rt_detr_head_is_rt_detr_whatever_its_name(tmp_path, monkeypatch):
    """Ultralytics tells RT-DETR by the head for a checkpoint and by the file name for a YAML; YOLO("mine.yaml") of
    a RevCol RT-DETR is RT-DETR, as its checkpoint would be. Models without a RevCol backbone are left as they were."""
    from ultralytics import RTDETR, YOLO

    monkeypatch.chdir(tmp_path)  # the export of a model built from a YAML is written to the working folder
    (tmp_path / "mine.yaml").write_text(TINY_RTDETR_YAML)
    (tmp_path / "plain.yaml").write_text(without_revcol(TINY_RTDETR_YAML))
    (tmp_path / "yolo.yaml").write_text(TINY_YOLO_YAML)
    for model in (YOLO(tmp_path / "mine.yaml"), YOLO(model=str(tmp_path / "mine.yaml"), task="detect")):
        assert type(model) is RTDETR and model.task == "detect" and model.model.yaml["head"][-1][2] == "RTDETRDecoder"
    exported = YOLO(tmp_path / "mine.yaml").export(format="torchscript", imgsz=64, device="cpu")
    assert Path(exported).resolve() == tmp_path / "mine.torchscript" and Path(exported).is_file()
    assert type(YOLO(tmp_path / "yolo.yaml")) is YOLO
    with pytest.raises(NotImplementedError):  # Ultralytics' own answer for a plain RT-DETR YAML under such a name
        YOLO(tmp_path / "plain.yaml")


def test_shipped_configs_name_their_scale_and_a_revcol_yaml_may_declare_one(tmp_path):
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    for name in shipped_configs():
        d = tasks.yaml_model_load(name)
        assert not d.get("scales") or d["scale"] in d["scales"], name  # so parse_model assumes nothing
    scales = "scales:\n  s: [0.5, 0.5, 1024]\n  m: [1.0, 1.0, 1024]\n"
    (tmp_path / "mine.yaml").write_text(f"scale: m\n{scales}{TINY_YOLO_YAML}")
    (tmp_path / "bad.yaml").write_text(f"scale: q\n{scales}{TINY_YOLO_YAML}")
    (tmp_path / "two.yaml").write_text(f"{scales}{TINY_YOLO_YAML}")
    ultralytics_logger = logging.getLogger("ultralytics")
    ultralytics_logger.addHandler(handler)
    try:
        model = tasks.DetectionModel(str(tmp_path / "mine.yaml"), verbose=False)
        assert not logged, logged
        assert model.yaml["scale"] == "m"
        tasks.DetectionModel(str(tmp_path / "two.yaml"), verbose=False)  # a choice left to make: Ultralytics warns
        assert any("no model scale passed" in message for message in logged)
    finally:
        ultralytics_logger.removeHandler(handler)
    with pytest.raises(revcol.ConfigError, match=r"scale 'q' is not one of its scales: s, m"):
        tasks.yaml_model_load(str(tmp_path / "bad.yaml"))


@pytest.fixture
def settings_of_a_clone(tmp_path, monkeypatch):
    """Ultralytics' settings as it writes them at its first import from a virtual environment inside a git checkout
    (``tmp_path / "clone"``), in a file of their own."""
    from ultralytics import utils

    clone = tmp_path / "clone"
    monkeypatch.setattr(utils, "GIT", SimpleNamespace(root=clone))
    settings = utils.SettingsManager(tmp_path / "settings.json")  # its defaults, from the GIT above
    monkeypatch.setattr(utils, "SETTINGS", settings)
    assert settings["runs_dir"] == str(clone / "runs")
    return settings


def test_the_settings_folders_derived_from_a_checkout_not_ultralytics_own_follow_the_working_folder(
    settings_of_a_clone, tmp_path
):
    import json

    settings_of_a_clone.update(weights_dir=str(tmp_path / "my-weights"))  # chosen by the user: it stays
    wrappers.own_settings()
    expected = {"runs_dir": "runs", "datasets_dir": "datasets", "weights_dir": str(tmp_path / "my-weights")}
    written = json.loads((tmp_path / "settings.json").read_text())
    assert {key: written[key] for key in expected} == expected
    assert wrappers.runs_dir(None) == Path("runs")


def test_the_settings_of_ultralytics_own_checkout_are_left_as_they_are(settings_of_a_clone, monkeypatch):
    import ultralytics
    from ultralytics import utils

    monkeypatch.setattr(utils, "GIT", SimpleNamespace(root=Path(ultralytics.__file__).resolve().parent.parent))
    before = dict(settings_of_a_clone)
    wrappers.own_settings()
    assert dict(settings_of_a_clone) == before
