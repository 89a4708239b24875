"""What revcol leaves changed in Ultralytics, compared attribute by attribute with its hook table.

One fresh interpreter (this file run as a script) imports the Ultralytics modules revcol touches and their
packages, lets plain Ultralytics train and predict once (so the state Ultralytics sets on itself is set), and
records every attribute of every loaded ``ultralytics*`` module, every ``__dict__`` entry of the classes they define
and of the objects of their own classes they hold. It records again after ``import revcol``, a short training, the
``revcol`` command run in-process, the demo's patching code and ``revcol.unregister()``, and reports by identity
which of those differ, with ``os.environ`` and every logger around the command and the demo, as JSON.
"""

from __future__ import annotations

import importlib
import json
import logging
import operator
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

REPORT = "revcol-hooks-report: "
# Bookkeeping the interpreter adds by itself: the warnings module's registry, copyreg's cache of slot names.
INTERPRETER_CACHES = frozenset({"__warningregistry__", "__slotnames__"})
IMGSZ = 32
MODELS = ("revcol.yaml", "rtdetr.yaml")  # a tiny RevCol YOLO and RT-DETR, and their plain twins "plain-<name>"
_MISSING = object()


def attributes() -> dict[tuple[str, str], object]:
    """``(owner, name) -> value`` of every attribute of every loaded ``ultralytics*`` module (owner: its name), every
    ``__dict__`` entry of each class a module defines and of each object of its own classes it holds (owner:
    ``"module:Class"``, ``"module:object"``)."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] != "ultralytics":
            continue
        for name, value in list(vars(module).items()):
            found[module_name, name] = value
            if isinstance(value, type) and value.__module__ == module_name:
                owner = f"{module_name}:{value.__qualname__}"
            elif type(value).__module__ == module_name and hasattr(value, "__dict__"):
                owner = f"{module_name}:{name}"
            else:
                continue
            found.update({(owner, key): entry for key, entry in list(vars(value).items())})
    return found


def changed(before: dict, after: dict) -> list[str]:
    """``"owner|name"`` of every attribute whose value is not the same object in both, for owners in both."""
    owners = {owner for owner, _ in before} & {owner for owner, _ in after}
    differ = set()
    for owner, name in before.keys() | after.keys():
        old, new = before.get((owner, name), _MISSING), after.get((owner, name), _MISSING)
        if owner in owners and name not in INTERPRETER_CACHES and not _same(old, new, f"{owner}.{name}"):
            differ.add(f"{owner}|{name}")
    return sorted(differ)


def _same(old: object, new: object, dotted: str) -> bool:
    """The same object; or a submodule imported in between (a package's new attribute); or a dict swapped for a
    shallow copy of itself, same keys and same values (Ultralytics' trainer does that to its default callbacks)."""
    if old is new:
        return True
    if old is _MISSING:
        return isinstance(new, types.ModuleType) and new.__name__ == dotted
    copied = type(old) is dict and type(new) is dict and old.keys() == new.keys()
    return copied and all(old[key] is new[key] for key in old)


def logger_states() -> dict[str, object]:
    """Level, handlers, ``propagate`` and ``disabled`` of the root logger and of every logger in logging's manager."""
    manager = logging.Logger.manager
    loggers = [
        ("", logging.getLogger()),
        *((n, g) for n, g in manager.loggerDict.items() if isinstance(g, logging.Logger)),
    ]
    states: dict[str, object] = {n: (g.level, list(g.handlers), g.propagate, g.disabled) for n, g in loggers}
    states["logging.disable"] = manager.disable
    return states


def logger_changes(before: dict[str, object]) -> list[str]:
    """The loggers whose state differs from ``before``; a logger made since (by an import) only if configured."""
    untouched = (logging.NOTSET, [], True, False)
    after = logger_states()
    return sorted(name for name, state in after.items() if before.get(name, untouched) != state)


def environ_changes(before: dict[str, str]) -> dict[str, list]:
    """``name: [before, now]`` of each environment variable set, changed or removed since ``before``."""
    now = dict(os.environ)
    return {
        name: [before.get(name), now.get(name)]
        for name in before.keys() | now.keys()
        if before.get(name) != now.get(name)
    }


def table(hooks: types.ModuleType, group: str) -> list[str]:
    """``"owner|name"`` of each attribute ``group`` of the hook table replaces, owners named as ``attributes`` does."""
    entries = set()
    for hook in (h for h in hooks.HOOKS if h.group == group):
        for owner in hooks.owners(hook):
            if isinstance(owner, types.ModuleType):
                where = owner.__name__
            else:
                where = f"{owner.__module__}:{owner.__qualname__}" if isinstance(owner, type) else hook.owner
            entries.add(f"{where}|{hook.name}")
    return sorted(entries)


def train(detector, data: Path, project: Path, name: str, **options):
    """One epoch of ``detector`` (an Ultralytics ``YOLO`` or ``RTDETR``) on the tiny ``data``; returns ``detector``."""
    detector.train(
        data=str(data), epochs=1, imgsz=IMGSZ, batch=2, workers=0, device="cpu", plots=False, amp=False,
        project=str(project), name=name, exist_ok=True, verbose=False, **options,
    )  # fmt: skip
    return detector


def kept_around(call, *args) -> dict:
    """Run ``call(*args)``; its result and what it left changed in ``os.environ`` and the loggers."""
    environ, loggers = dict(os.environ), logger_states()
    result = call(*args)
    return {"result": result, "environ": environ_changes(environ), "loggers": logger_changes(loggers)}


def probe(work: Path, modules: list[str]) -> dict:
    """The stages, each compared with Ultralytics as it was before ``import revcol``."""
    for module in modules:
        importlib.import_module(module)
    import matplotlib
    from ultralytics import RTDETR, YOLO
    from ultralytics.utils import USER_CONFIG_DIR

    # A font in the (temporary) settings folder: plain Ultralytics, checking the dataset, would fetch Arial.ttf.
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", USER_CONFIG_DIR / "Arial.ttf")

    for name, family in zip(MODELS, (YOLO, RTDETR), strict=True):  # what Ultralytics sets on itself, set
        plain = train(family(str(work / f"plain-{name}")), work / "data" / "data.yaml", work / "runs", name)
        plain.predict(work / "data" / "images" / "val", imgsz=IMGSZ, verbose=False)
    before = attributes()
    import revcol
    from revcol.cli import main
    from revcol.demo.run import denoising_queries, offline
    from revcol.ultralytics import hooks

    report: dict = {group: table(hooks, group) for group in (hooks.REGISTER, hooks.OFFLINE, hooks.CLI)}
    report["import"] = changed(before, attributes())

    detector, saves = revcol_training(YOLO(str(work / "revcol.yaml")), work)
    report["train"] = changed(before, attributes())
    report["trainer_paths_kept"] = saves

    best = Path(detector.trainer.best)
    validate = ["val", f"model={best}", f"data={work / 'data' / 'data.yaml'}", f"imgsz={IMGSZ}", "batch=2"]
    validate += ["device=cpu", "plots=False", f"project={work / 'runs'}", "name=val", "exist_ok=True"]
    report["cli"] = kept_around(lambda: [main(validate), main(["info", str(work / "cls.yaml"), "--imgsz", "64"])])
    report["cli"]["changed"] = changed(before, attributes())

    with offline():
        report["inside_offline"] = changed(before, attributes())
    report["denoising"] = denoising(work / "rtdetr.yaml", denoising_queries)
    demo = ["demo", "--output", str(work / "demo"), "--epochs", "1", "--imgsz", "64", "--batch", "2"]
    offline_setting = os.environ.pop("YOLO_OFFLINE")  # the demo sets it for its run: it must not stay set
    report["demo"] = kept_around(main, [*demo, "--train-images", "2", "--val-images", "1", "--test-images", "1"])
    os.environ["YOLO_OFFLINE"] = offline_setting
    report["demo"]["changed"] = changed(before, attributes())

    revcol.unregister()
    report["unregister"] = changed(before, attributes())
    return report


def revcol_training(detector, work: Path) -> tuple[object, list[bool]]:
    """The short training of a RevCol model; for each save, whether the trainer had its own paths back after it."""
    names, start, kept = ("last", "best", "wdir"), [], []

    def paths(trainer) -> list:
        return [getattr(trainer, name) for name in names]

    detector.add_callback("on_train_start", lambda trainer: start.extend(paths(trainer)))
    detector.add_callback("on_model_save", lambda trainer: kept.append(all(map(operator.is_, paths(trainer), start))))
    return train(detector, work / "data" / "data.yaml", work / "runs", "revcol", save_period=1), kept


def denoising(model_yaml: Path, denoising_queries) -> dict[str, list[int]]:
    """The RT-DETR decoders' denoising queries before, inside and after the demo's ``denoising_queries(model, 3)``."""
    from ultralytics.nn.modules.head import RTDETRDecoder
    from ultralytics.nn.tasks import RTDETRDetectionModel

    model = RTDETRDetectionModel(str(model_yaml), verbose=False)

    def counts() -> list[int]:
        return [m.num_denoising for m in model.modules() if isinstance(m, RTDETRDecoder)]

    before = counts()
    with denoising_queries(model, 3):
        inside = counts()
    return {"before": before, "inside": inside, "after": counts()}


def run_probe(work: Path) -> dict:
    """The tiny dataset and models in ``work``, then ``probe`` in a fresh interpreter; its report."""
    from helpers.processes import revcol_env
    from helpers.yamls import TINY_OPTIONS, TINY_RTDETR_YAML, TINY_YOLO_YAML, revcol_row, tiny_yaml, without_revcol

    from revcol.demo import generate_dataset
    from revcol.ultralytics import hooks

    generate_dataset(work / "data", n_train=4, n_val=2, imgsz=IMGSZ, seed=0)
    for name, text in zip(MODELS, (TINY_YOLO_YAML, TINY_RTDETR_YAML), strict=True):
        (work / name).write_text(text)
        (work / f"plain-{name}").write_text(without_revcol(text))
    (work / "cls.yaml").write_text(tiny_yaml("[-1, 1, Classify, [nc]]", backbone=revcol_row(TINY_OPTIONS), neck=""))
    modules = {"ultralytics", *(h.owner.partition(":")[0] for h in hooks.HOOKS), *(h.subclasses for h in hooks.HOOKS)}
    command = [sys.executable, __file__, str(work), *sorted(filter(None, modules))]
    out = subprocess.run(command, cwd=work, env=revcol_env(work), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith(REPORT))[len(REPORT) :])


def test_revcol_changes_in_ultralytics_exactly_what_its_hook_table_declares(tmp_path):
    from revcol.ultralytics import hooks

    report = run_probe(tmp_path)

    register = report[hooks.REGISTER]
    assert len(register) > 10 and report["import"] == register
    assert report["train"] == register
    assert report["trainer_paths_kept"] == [True]  # the one save: the save group gave the trainer its paths back
    assert report["cli"] == {"result": [0, 0], "environ": {}, "loggers": [], "changed": register}
    assert set(register) < set(report["inside_offline"]) <= set(register) | set(report[hooks.OFFLINE])
    assert report["denoising"]["inside"] == [3] and report["denoising"]["after"] == report["denoising"]["before"]
    assert report["demo"] == {"result": 0, "environ": {}, "loggers": [], "changed": register}
    assert report["unregister"] == []
    assert not (tmp_path / "network.log").exists(), (tmp_path / "network.log").read_text()


if __name__ == "__main__":
    print(REPORT + json.dumps(probe(Path(sys.argv[1]), sys.argv[2:])))
