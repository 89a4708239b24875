"""The package's shape (docs/design.md, "Module map"): imports flow one way, modules and functions stay small,
and the module paths of earlier releases stay importable."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pytest
from helpers.models import TINY_CONFIG

import revcol
from revcol import _legacy

PACKAGE = Path(revcol.__file__).parent
ROOT = PACKAGE.parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# Each part of the package and the parts it may import; a part may import itself. The package root (revcol/__init__)
# is the public face: it imports every part, and only the applications import it back.
BASE = {"revcol.errors", "revcol._atomic", "revcol._allow_list", "revcol._legacy", "revcol._process"}
BASE.add("revcol._after_import")
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "revcol.core": {"base"},
    "revcol.diagnostics": {"base", "revcol.core"},
    "revcol.checkpoints": {"base", "revcol.core"},
    "revcol.weights": {"base", "revcol.core", "revcol.checkpoints"},
    "revcol.factory": {"base", "revcol.core", "revcol.checkpoints", "revcol.weights"},
    "revcol._timm_features": {"base"},
    "revcol.timm_models": {
        "base",
        "revcol.core",
        "revcol.checkpoints",
        "revcol.weights",
        "revcol.factory",
        "revcol._timm_features",
    },
    "revcol.distributed": {"base", "revcol.core", "revcol.checkpoints"},
    "revcol.ultralytics": {"base", "revcol.core", "revcol.checkpoints", "revcol.weights", "revcol.factory"},
    "revcol.torchvision": {"base", "revcol.core", "revcol.checkpoints", "revcol.weights", "revcol.factory"},
}
APPLICATIONS = {"revcol.cli", "revcol.demo"}  # the command line and the demo may use every part


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    if module in BASE:
        return "base"
    return next((part for part in [*ALLOWED, *APPLICATIONS] if module == part or module.startswith(part + ".")), module)


def _revcol_imports(path: Path, module: str) -> set[str]:
    """Every revcol module ``path`` imports, at module level or inside functions (the package imports absolutely)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: relative import"
            base = node.module or ""
            found |= {f"{base}.{alias.name}" for alias in node.names} if base == "revcol" else {base}
    return {name for name in found if name == "revcol" or name.startswith("revcol.")}


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in SOURCES if p != PACKAGE / "__init__.py"], ids=lambda p: p.name)
def test_imports_flow_from_plugins_to_the_core(path):
    module = _module_name(path)
    part = _part(module)
    assert part in ALLOWED or part in APPLICATIONS, f"{module} belongs to no part of the layout: add it to ALLOWED"
    allowed = ALLOWED.get(part)
    wrong = []
    for imported in _revcol_imports(path, module):
        target = _part(imported)
        back_to_root = imported == "revcol" and part not in APPLICATIONS
        if back_to_root or (allowed is not None and target != part and target not in allowed):
            wrong.append(imported)
    assert not wrong, f"{module} ({part}) imports {sorted(wrong)}; it may import {sorted(allowed or {'anything'})}"


PYTHON_FILES = [*SOURCES, *sorted((ROOT / "benchmarks").rglob("*.py")), *sorted((ROOT / "examples").rglob("*.py"))]


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({node.end_lineno - first + 1} lines)")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


# Names earlier releases documented or pickled, by their old module paths.
OLD_NAMES = {
    "revcol.model": ["FullNet", "SubNet", "Level", "Fusion", "UpSample", "ConvNextBlock", "Stem", "parameter_count"],
    "revcol.reversible": ["ReverseFunction"],
    "revcol.variants": ["VARIANTS", "VariantSpec", "build_variant", "revcol_small", "load_weights"],
    "revcol.lr_decay": ["lr_scale", "layer_id"],
    "revcol.pretrained": ["load_pretrained", "read_backbone", "read_checkpoint", "save_backbone", "LoadResult"],
    "revcol.integration": ["RevColBackbone", "checkpoint_classes_allowed", "CHECKPOINT_CLASSES", "CONFIG_DIR"],
    "revcol.contract": ["expand_backbone", "CONFIG_DIR"],
    "revcol.hooks": ["HOOKS", "register", "unregister", "is_registered"],
    "revcol.trainers": ["RevColDetectionTrainer", "RevColRTDETRTrainer"],
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_module_paths_still_import(old):
    module = importlib.import_module(old)
    for name in OLD_NAMES[old]:
        value = getattr(module, name)
        home = importlib.import_module(value.__module__) if hasattr(value, "__module__") else None
        assert home is None or getattr(home, name, value) is value or not hasattr(home, name), (old, name)
    assert set(OLD_NAMES) <= set(_legacy.MOVED), "every old path is declared once, in revcol._legacy.MOVED"


def test_an_object_pickled_under_an_old_path_loads_as_today():
    net = revcol.FullNet(**TINY_CONFIG)
    # the GLOBAL opcodes a file written before the module map holds: revcol.model.<Class>
    data = pickle.dumps(net, protocol=2).replace(b"revcol.core.network", b"revcol.model")
    data = data.replace(b"revcol.core.blocks", b"revcol.model")
    assert b"revcol.core" not in data
    loaded = pickle.loads(data)
    assert type(loaded) is revcol.FullNet
    assert all(a.equal(b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True))
