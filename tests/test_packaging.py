"""Packaging: the wheel carries the configs, the README states the tested floors, the repo stands alone."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from revcol_helpers import TINY_CHANNELS, make_input, run_grads

import revcol

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(revcol.__file__).parent
CORE_MODULES = ["__init__.py", "model.py", "reversible.py", "variants.py", "pretrained.py", "errors.py"]


def test_wheel_install_loads_shipped_configs_by_bare_name(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("revcol-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    script = (
        "import revcol, sys\n"
        f"assert revcol.__file__.startswith({str(target)!r}), revcol.__file__\n"
        "from ultralytics import RTDETR, YOLO\n"
        "for name in ('rtdetr-revcol.yaml', 'rtdetr-revcol-cpu.yaml'):\n"
        "    assert type(RTDETR(name).model.model[0]).__name__ == 'RevColBackbone'\n"
        "assert YOLO('yolo-revcol.yaml').model.model[1].index == 0\n"
        "from ultralytics.nn import tasks\n"  # the task configs: packaged and served, not built (seconds each)
        "heads = {'seg': 'Segment', 'pose': 'Pose', 'obb': 'OBB', 'cls': 'Classify'}\n"
        "for task, head in heads.items():\n"
        "    name = f'yolo-revcol-{task}.yaml'\n"
        f"    assert tasks.check_yaml(name).startswith({str(target)!r}), name\n"
        "    assert tasks.yaml_model_load(name)['head'][-1][2] == head, name\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "YOLO_OFFLINE": "true"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def _requirement(text: str) -> tuple[str, frozenset[str]]:
    name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*([<>=!~][^;]*)", text.strip()).groups()
    return name.lower(), frozenset(part.strip() for part in spec.split(","))


def test_readme_states_every_dependency_floor():
    installed = {_requirement(r) for r in importlib.metadata.requires("revcol") if "extra ==" not in r}
    readme = (ROOT / "README.md").read_text()
    stated = {_requirement(m) for m in re.findall(r"`([A-Za-z][A-Za-z0-9_.-]*\s*[<>=~][^`]*)`", readme)}
    assert len(installed) >= 5
    assert installed <= stated, f"README does not state {sorted(installed - stated)}"


def test_nothing_refers_to_files_outside_the_repository():
    """A clone has nothing beside it: no code, test or doc may read or cite a file outside the repository."""
    outside = re.compile(r"\.\./shared|shared/[d]esign|design section \d")
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("src", "tests", "docs", "examples", "benchmarks", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".toml", ""}]
    files = [p for p in files if p.is_file() and "egg-info" not in str(p) and "__pycache__" not in str(p)]
    assert len(files) > 20
    offending = [str(p.relative_to(ROOT)) for p in files if outside.search(p.read_text(errors="replace"))]
    assert offending == []


# --------------------------------------------------------------------------- deprecations


def test_core_source_uses_no_deprecated_api():
    forbidden = [
        "torch.cuda.amp",
        "get_autocast_gpu_dtype",
        "get_autocast_cpu_dtype",
        "timm.models.layers",
        "custom_fwd",
    ]
    for module in CORE_MODULES:
        text = (PACKAGE_DIR / module).read_text()
        for name in forbidden:
            assert name not in text, f"{module} uses deprecated {name}"
    assert re.search(r"is_autocast_enabled\(\s*\)", (PACKAGE_DIR / "reversible.py").read_text()) is None


def test_core_path_emits_no_deprecation_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = revcol.FullNet(TINY_CHANNELS, (1, 1, 1, 1), 2, drop_path=0.1)
        x = make_input(dtype=torch.float32)
        for autocast in (None, torch.bfloat16):
            for save_memory in (True, False):
                run_grads(model, x, save_memory=save_memory, autocast_dtype=autocast)
        with torch.no_grad():
            model.eval()(x)
        torch.save(model.state_dict(), tmp_path / "w.pth")
        revcol.load_pretrained(model, tmp_path / "w.pth")
    from_revcol = [
        w
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and str(PACKAGE_DIR) in str(w.filename)
    ]
    assert from_revcol == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in from_revcol]
