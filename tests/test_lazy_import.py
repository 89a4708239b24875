"""``import revcol`` and the ``revcol`` command import no torch, timm or Ultralytics, and the registrations still happen
whichever is imported first (``revcol._after_import``)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.processes import revcol_env

import revcol
from revcol import _after_import

REVCOL = Path(sys.executable).with_name("revcol")
HEAVY = ("torch", "timm", "ultralytics", "torchvision")


def python(code: str, workdir: Path) -> str:
    """Run ``code`` in a fresh interpreter; its stdout."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=workdir,
        env=revcol_env(workdir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_the_lazy_table_is_what_type_checkers_see_and_what_is_public():
    tree = ast.parse(Path(revcol.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {(node.module, alias.name) for node in guarded.body for alias in node.names}
    assert seen == {(module, name) for module, names in revcol.LAZY.items() for name in names}
    # the names it imports at once: from its light modules (the errors, the registration)
    eager = {a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module.startswith("revcol.")
             for a in node.names}  # fmt: skip
    assert set(revcol.__all__) == {name for _, name in seen} | eager
    for name in revcol.__all__:
        value = getattr(revcol, name)
        assert name in dir(revcol)
        if name in revcol._HOME:
            assert value is getattr(importlib.import_module(revcol._HOME[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'FullNett'"):
        revcol.FullNett  # noqa: B018


def test_import_revcol_imports_no_heavy_library(tmp_path):
    loaded = python(f"import sys, revcol; print(sorted(m for m in {HEAVY!r} if m in sys.modules))", tmp_path)
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["help"], ["demo", "--help"]])
def test_the_command_answers_help_without_torch(tmp_path, args):
    env = {**revcol_env(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    run = subprocess.run([str(REVCOL), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(("revcol: RevCol", "usage: revcol demo"))
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "revcol.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


# Each order in which a user's code may meet the libraries; every one ends registered with both.
ORDERS = {
    "revcol, then ultralytics": "import revcol\nfrom ultralytics import RTDETR",
    "ultralytics, then revcol": "import ultralytics\nimport revcol",
    "timm, then revcol": "import timm\nimport revcol",
    "a module that imports timm": "import revcol\nfrom revcol.core.network import FullNet\nimport timm",
    "a module that imports ultralytics": "import revcol.ultralytics.trainers\nimport revcol",
    "a public name first": "import revcol\nrevcol.FullNet\nimport ultralytics",
}


@pytest.mark.parametrize("order", ORDERS)
def test_registered_whichever_library_comes_first(tmp_path, order):
    code = f"""
        import sys
        {textwrap.indent(ORDERS[order], " " * 8).lstrip()}
        import timm
        import ultralytics
        from revcol import _after_import
        from ultralytics import YOLO
        model = YOLO("rtdetr-revcol-cpu.yaml")
        print(revcol.is_registered(), "revcol_tiny" in timm.list_models(), type(model).__name__,
              _after_import.waiting(), _after_import._FINDER in sys.meta_path)
    """
    last_line = python(code, tmp_path).splitlines()[-1]  # after Ultralytics' own messages
    assert last_line.split() == ["True", "True", "RTDETR", "[]", "False"]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A new top-level package, importable from ``tmp_path``; forgotten afterwards."""
    (tmp_path / "after_import_probe").mkdir()
    (tmp_path / "after_import_probe" / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "after_import_probe"
    sys.modules.pop("after_import_probe", None)
    _after_import._waiting.pop("after_import_probe", None)
    if not _after_import._waiting and _after_import._FINDER in sys.meta_path:
        sys.meta_path.remove(_after_import._FINDER)


def test_a_callback_runs_once_after_the_import_and_the_module_keeps_its_loader(package):
    calls = []
    _after_import.when_imported(package, lambda: calls.append(sys.modules[package].VALUE))
    assert calls == [] and package in _after_import.waiting()
    module = importlib.import_module(package)
    assert calls == [42] and package not in _after_import.waiting()
    assert module.__loader__ is module.__spec__.loader and type(module.__loader__).__module__ != _after_import.__name__
    importlib.reload(module)
    assert calls == [42]
    _after_import.when_imported(package, lambda: calls.append("now"))  # already imported: at once
    assert calls == [42, "now"]


def test_a_failed_import_keeps_the_callback_waiting(package, tmp_path):
    init = tmp_path / package / "__init__.py"
    init.write_text("raise ImportError('not yet')\n")
    calls = []
    _after_import.when_imported(package, lambda: calls.append(1))
    with pytest.raises(ImportError, match="not yet"):
        importlib.import_module(package)
    assert calls == [] and package in _after_import.waiting()
    init.write_text("VALUE = 1\n")
    importlib.invalidate_caches()
    importlib.import_module(package)
    assert calls == [1]
