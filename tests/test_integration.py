"""The Ultralytics shim: registration, YAML expansion, options, errors, predict extras (no training)."""

from __future__ import annotations

import ast
import copy
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import ultralytics
import yaml
from revcol_helpers import TINY_RTDETR_YAML
from ultralytics import RTDETR
from ultralytics.engine.model import Model
from ultralytics.nn import tasks
from ultralytics.nn.modules import Index

import revcol
from revcol.ultralytics import hooks, releases, yaml_rows
from revcol.ultralytics.backbone import RevColBackbone
from revcol.ultralytics.trainers import RevColDetectionTrainer, exclude_from_weight_decay, no_decay_parameters

SEED_YAML = yaml_rows.CONFIG_DIR / "rtdetr-revcol.yaml"
TINY = {"channels": [8, 16, 24, 32], "layers": [1, 1, 1, 1], "num_subnet": 2}


def rtdetr_dict(name: str = "revcol", options: dict | None = None) -> dict:
    """The section-5 model dict with its backbone row renamed (and options set)."""
    d = yaml.safe_load(SEED_YAML.read_text())
    d["backbone"][0] = [-1, 1, name, [options] if options is not None else []]
    return d


def tiny_rtdetr(**options) -> tasks.RTDETRDetectionModel:
    return tasks.RTDETRDetectionModel(rtdetr_dict("revcol", {**TINY, **options}), verbose=False)


def test_shipped_rtdetr_config_is_the_design_doc_reference_verbatim():
    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    section = design.split("## YAML contract", 1)[1].split("\n## ", 1)[0]
    reference = section.split("```yaml\n")[-1].split("```", 1)[0]
    assert reference.startswith("nc: 80") and "RTDETRDecoder" in reference
    assert SEED_YAML.read_text() == reference


@pytest.mark.parametrize("variant", list(revcol.VARIANTS))
def test_seed_yaml_layer_layout_for_every_variant(variant):
    d = rtdetr_dict(variant)
    with torch.device("meta"):
        model = tasks.RTDETRDetectionModel(d, verbose=False)
    layers = model.model
    spec = revcol.VARIANTS[variant]
    assert isinstance(layers[0], RevColBackbone) and layers[0].variant == variant
    assert layers[0].channels == spec.channels and layers[0].num_subnet == spec.num_subnet
    for level in range(4):
        assert isinstance(layers[level + 1], Index) and layers[level + 1].index == level
        assert layers[level + 1].f == 0
    # head rows 5, 9 and 14 read P5, P4 and P3 (indexes -1=4, 3 and 2): their convs see those widths
    assert layers[5].conv.in_channels == spec.channels[3]
    assert layers[9].conv.in_channels == spec.channels[2]
    assert layers[14].conv.in_channels == spec.channels[1]
    assert len(layers) == 24 and layers[5].i == 5


def test_shipped_configs_load_by_bare_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = RTDETR("rtdetr-revcol-cpu.yaml")
    assert isinstance(model.model.model[0], RevColBackbone)
    assert {p.name for p in yaml_rows.CONFIG_DIR.glob("*.yaml")} >= {
        "rtdetr-revcol.yaml",
        "rtdetr-revcol-cpu.yaml",
        "yolo-revcol.yaml",
    }


def test_yolo_config_builds_with_detect_head():
    with torch.device("meta"):
        d = tasks.yaml_model_load("yolo-revcol.yaml")
    model = tasks.DetectionModel(d, verbose=False)
    assert isinstance(model.model[0], RevColBackbone)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_options_reach_the_backbone():
    backbone = tiny_rtdetr(save_memory=False, drop_path=0.2, kernel_size=5).model[0]
    assert backbone.save_memory is False and backbone.drop_path == 0.2 and backbone.kernel_size == 5
    assert backbone.width_list == TINY["channels"]


def test_pretrained_option_loads_authors_layout(tmp_path):
    reference = revcol.FullNet(**TINY)
    state = {f"module.{k}": v.clone().normal_() for k, v in reference.state_dict().items()}
    state["module.cls.classifier.weight"] = torch.zeros(10, 32)
    path = tmp_path / "authors.pth"
    torch.save({"model": state, "epoch": 300}, path)
    backbone = tiny_rtdetr(pretrained=str(path)).model[0]
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"module.{key}"], rtol=0, atol=0)


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


def test_no_unittest_mock_in_the_library():
    for path in Path(revcol.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name == "unittest" or name.startswith("unittest.") for name in imported), path.name


def test_the_yaml_contract_imports_no_ultralytics():
    source = (Path(revcol.__file__).parent / "ultralytics" / "yaml_rows.py").read_text()
    tree = ast.parse(source)
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] in {"ultralytics", "torch", "timm"} for m in modules), modules


def _revcol_imports(path: Path) -> set[str]:
    """The ``revcol.*`` modules that module ``path`` imports anywhere (functions too), except for type checking."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "revcol":
                found |= {f"revcol.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("revcol.") and m != f"revcol.{path.stem}"}


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    imports = {f"revcol.{p.stem}": _revcol_imports(p) for p in Path(revcol.__file__).parent.glob("*.py")}

    def reaches(start: str, goal: str, seen: frozenset) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports.get(start, ()))

    cycles = sorted(m for m in imports if m != "revcol.__init__" and reaches(m, m, frozenset()))
    assert cycles == [], cycles


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
        model = tasks.RTDETRDetectionModel(rtdetr_dict("revcol", TINY), verbose=False)
        assert isinstance(model.model[0], RevColBackbone) and len(calls) == 2
    finally:
        revcol.unregister()
        tasks.parse_model = originals[tasks, "parse_model"]


def test_supported_range_is_the_one_in_the_package_metadata():
    import importlib.metadata

    declared = next(r for r in importlib.metadata.requires("revcol") if r.startswith("ultralytics") and "<" in r)
    assert declared == f"ultralytics{releases.supported_ultralytics()}"
    from ultralytics.utils.checks import check_version

    assert check_version(ultralytics.__version__, releases.supported_ultralytics())


@pytest.mark.parametrize("version", ["9.1.0", "8.4.66"])
def test_unsupported_ultralytics_version_is_refused(monkeypatch, version):
    revcol.unregister()
    monkeypatch.setattr(ultralytics, "__version__", version)
    try:
        with pytest.raises(RuntimeError, match=rf"{releases.supported_ultralytics()}.*{version}"):
            revcol.register()
        assert not revcol.is_registered()
    finally:
        monkeypatch.undo()
        revcol.register()


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("revcol_giant", [], r"unknown RevCol backbone 'revcol_giant'.*revcol_small"),
        ("revcol_small", [{"pretrained": "x.pth", "dropout": 0.1}], r"unknown option\(s\) \['dropout'\]"),
        ("revcol_small", ["x.pth", True], r"takes \[\] or one mapping of options"),
        ("revcol_tiny", [{"drop_path": 1.5}], r"drop_path must be a number in \[0, 1\)"),
        ("revcol", [{"channels": [8, 16, 24, 32]}], r"needs channels, layers and num_subnet"),
        ("revcol", [], r"needs channels, layers and num_subnet; missing \['channels', 'layers', 'num_subnet'\]"),
        ("revcol", None, r"missing \['channels', 'layers', 'num_subnet'\]"),
        ("revcol", [{}], r"missing \['channels', 'layers', 'num_subnet'\]"),
        ("revcol", [{"layers": [1, 1, 1, 1], "num_subnet": 2}], r"missing \['channels'\] \(e\.g\. \[-1, 1, revcol"),
        ("revcol_tiny", [{"pretrained": "does/not/exist.pth"}], r"checkpoint not found"),
        ("revcol_tiny", [{"save_memory": "False"}], r"save_memory must be True or False, got 'False'"),
        ("revcol_tiny", [{"kernel_size": True}], r"kernel_size must be a positive odd int, got True"),
        ("revcol_tiny", [{"drop_path": "0.1"}], r"drop_path must be a number in \[0, 1\), got '0.1'"),
    ],
)
def test_bad_backbone_rows_fail_clearly(name, args, match):
    d = rtdetr_dict()
    d["backbone"][0] = [-1, 1, name, args]
    with pytest.raises(revcol.RevColError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize("row", [[-1, 1, "revcol"], [-1, 1, "revcol_tiny"], [-1, 1, "revcol_tiny", [], 5]])
def test_a_revcol_row_of_other_than_four_items_is_a_config_error(row):
    d = rtdetr_dict()
    d["backbone"][0] = row
    with pytest.raises(revcol.ConfigError, match=rf"has four items.*got {len(row)}"):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ([9, 1, "Conv", [256, 1, 1]], r"layer 5 .* takes input from layer 9, which does not exist"),
        ([0, 1, "Conv", [256, 1, 1]], r"takes the backbone's list output \(layer 0\); use 1-4"),
    ],
)
def test_head_index_outside_the_backbone_slots_fails_clearly(row, match):
    d = rtdetr_dict("revcol", TINY)
    d["head"][0] = row
    with pytest.raises(ValueError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


@pytest.mark.parametrize("where", ["head", "backbone"])
def test_revcol_row_outside_the_first_backbone_row_names_the_row(where):
    d = rtdetr_dict("revcol", TINY)
    d[where].insert(1, [-1, 1, "revcol_tiny", []])
    match = rf"first backbone row .*found at {where} row 1 \[-1, 1, 'revcol_tiny'"
    with pytest.raises(revcol.ConfigError, match=match):
        tasks.RTDETRDetectionModel(d, verbose=False)


def test_revcol_row_in_the_head_of_a_non_revcol_backbone_is_a_config_error():
    d = rtdetr_dict("revcol", TINY)
    d["backbone"] = [[-1, 1, "Conv", [16, 3, 2]]]
    d["head"] = [[-1, 1, "revcol_small", []]]
    with pytest.raises(revcol.ConfigError, match=r"found at head row 0"):
        tasks.RTDETRDetectionModel(d, verbose=False)


def test_numpy_integers_work_wherever_ints_do():
    options = {
        "channels": [np.int64(c) for c in TINY["channels"]],
        "layers": [np.int32(v) for v in TINY["layers"]],
        "num_subnet": np.int64(2),
        "kernel_size": np.int16(5),
    }
    backbone = tasks.RTDETRDetectionModel(rtdetr_dict("revcol", options), verbose=False).model[0]
    assert backbone.channels == tuple(TINY["channels"]) and backbone.num_subnet == 2 and backbone.kernel_size == 5
    assert all(type(c) is int for c in backbone.width_list)


def test_empty_image_through_the_ultralytics_model_is_an_input_error():
    model = tiny_rtdetr().eval()
    with pytest.raises(revcol.InputError, match=r"positive multiples of 32 .*got 0x64"):
        model.predict(torch.zeros(1, 3, 0, 64))


def test_info_of_a_classify_yaml_prints_one_summary(tmp_path, capsys):
    from revcol import cli

    path = tmp_path / "cls-revcol.yaml"
    path.write_text(f"nc: 3\nbackbone:\n  - [-1, 1, revcol, [{TINY}]]\nhead:\n  - [-1, 1, Classify, [nc]]\n")
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    ultralytics.utils.LOGGER.addHandler(handler)
    try:
        assert cli.main(["info", str(path), "--imgsz", "64"]) == 0
    finally:
        ultralytics.utils.LOGGER.removeHandler(handler)
    summaries = [m for m in logged + capsys.readouterr().out.splitlines() if "summary" in m]
    assert len(summaries) == 1, summaries


def test_predict_extras_handle_the_list_output(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RTDETR_YAML)
    model = RTDETR(str(tmp_path / "tiny.yaml"))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    embedding = model.predict(image, imgsz=64, embed=[0], verbose=False)
    assert embedding[0].shape == (sum(model.model.model[0].width_list),)
    torch_model = model.model.eval()
    torch_model.predict(torch.zeros(1, 3, 64, 64), profile=True)
    results = model.predict(image, imgsz=64, visualize=True, verbose=False, project=str(tmp_path), name="vis")
    assert len(results) == 1
    # Ultralytics draws per-layer feature maps (older releases) or a LayerCAM picture (newer) of a RevCol model
    pictures = [p for p in (tmp_path / "vis").rglob("*") if p.suffix in {".jpg", ".png"} and p.stat().st_size]
    assert pictures


def test_info_reports_gflops():
    # 96 px: the config's 100 queries need that many anchors (Ultralytics before 8.4.146 does not cap them)
    _, _, _, flops = RTDETR("rtdetr-revcol-cpu.yaml").model.info(imgsz=96)
    assert flops > 0


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


def test_model_dict_is_not_modified_by_expansion():
    d = rtdetr_dict("revcol", TINY)
    before = copy.deepcopy(d)
    model = tasks.RTDETRDetectionModel(d, verbose=False)
    assert model.yaml["backbone"] == before["backbone"]


# sha256 (first 16 hex digits) of "name shape" per state-dict entry, and the entry count, of each shipped config as
# built before the hook table and the YAML contract moved (the same on Ultralytics 8.4.67 and 8.4.190).
SHIPPED_STATE = {
    "rtdetr-revcol-cpu.yaml": ("2de7c91dc64dab2c", 389),
    "rtdetr-revcol-demo.yaml": ("85bbdd208b8c9062", 389),
    "rtdetr-revcol.yaml": ("98f62a84ece7cda3", 1331),
    "yolo-revcol-cls.yaml": ("e6ebde4bb33c141a", 472),
    "yolo-revcol-obb.yaml": ("87b666e40408e804", 711),
    "yolo-revcol-pose.yaml": ("cb3fc9eae3fe2b8d", 711),
    "yolo-revcol-seg.yaml": ("8b6d50c806372e65", 731),
    "yolo-revcol.yaml": ("bfd0974f309a46af", 669),
}
# A fresh interpreter: what earlier tests did to Ultralytics' state in this one (8.4.67 keeps some) cannot leak in.
STATE_OF_SHIPPED = """
import hashlib, json, sys
import revcol
from ultralytics.nn import tasks

classes = {"RTDETRDecoder": tasks.RTDETRDetectionModel, "Classify": tasks.ClassificationModel,
           "Segment": tasks.SegmentationModel, "Pose": tasks.PoseModel, "OBB": tasks.OBBModel,
           "Detect": tasks.DetectionModel}
out = {}
for config in sys.argv[1:]:
    d = tasks.yaml_model_load(config)
    state = classes[d["head"][-1][2]](d, verbose=False).state_dict()
    text = "\\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    out[config] = [hashlib.sha256(text.encode()).hexdigest()[:16], len(state)]
print(json.dumps(out))
"""


def test_shipped_configs_build_the_same_models_as_before(tmp_path):
    import json
    import subprocess
    import sys

    from revcol_helpers import revcol_env

    command = [sys.executable, "-c", STATE_OF_SHIPPED, *SHIPPED_STATE]
    out = subprocess.run(command, cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    built = {k: tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert built == SHIPPED_STATE
