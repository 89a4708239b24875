"""Packaging: the wheel carries the configs, the README states the tested floors, the repo stands alone."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from helpers.models import TINY_CONFIG, make_input

import revcol
from revcol.diagnostics import gradients

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(revcol.__file__).parent
CORE_MODULES = [
    "__init__.py",
    "errors.py",
    *(f"{p.parent.name}/{p.name}" for p in sorted(PACKAGE_DIR.glob("core/*.py"))),
]
CORE_MODULES += [f"checkpoints/{p.name}" for p in sorted(PACKAGE_DIR.glob("checkpoints/*.py"))]


def test_wheel_install_loads_shipped_configs_by_bare_name(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Built from a copy, so the checkout gets no build/ folder, with the installed setuptools (a dev extra), so no
    # build environment is fetched from the network.
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("revcol-*.whl")
    install = [*pip, "install", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
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
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
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


# --------------------------------------------------------------------------- documentation

README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings, fenced = [], False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            headings.append(line.lstrip("#"))
    return {_slug(h) for h in headings}


def _local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]


def _readme_pages() -> list[Path]:
    """The README and every page it links to."""
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.split("#")[0]).resolve() for t in _local_links(readme) if t.split("#")[0]}
    return [readme, *sorted(p for p in linked if p.suffix == ".md")]


def test_readme_is_short_and_leads_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    commands = [i for i, line in enumerate(lines) if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and commands[1] < 20
    assert "revcol demo" in lines[commands[0]] and "python -m pytest -q" in lines[commands[1]]
    quick_starts = [line for line in lines if line.startswith("## Quick start")]
    assert quick_starts == [
        "## Quick start: Ultralytics",
        "## Quick start: PyTorch",
        "## Quick start: timm",
        "## Quick start: torchvision and Hugging Face",
    ]


def test_every_local_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    broken = []
    for page in pages:
        for target in _local_links(page):
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert len(pages) > 5
    assert broken == []


def test_every_public_name_is_documented_in_a_page_the_readme_links():
    text = "\n".join(page.read_text() for page in _readme_pages())
    blocks = re.findall(r"^```.*?^```", text, flags=re.S | re.M)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    code = "\n".join(blocks + inline)  # a name counts where it is written as code, not in prose
    undocumented = [name for name in revcol.__all__ if not re.search(rf"\b{name}\b", code)]
    assert undocumented == []


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
    assert re.search(r"is_autocast_enabled\(\s*\)", (PACKAGE_DIR / "core" / "reversible.py").read_text()) is None


def test_core_path_emits_no_deprecation_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = revcol.FullNet(**TINY_CONFIG, drop_path=0.1)
        x = make_input(dtype=torch.float32)
        for autocast in (None, torch.bfloat16):
            for save_memory in (True, False):
                gradients(model, x, save_memory=save_memory, autocast_dtype=autocast)
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
