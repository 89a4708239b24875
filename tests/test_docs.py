"""The README and docs/ show the data of src/revcol: their tables are generated from it (``docs/generate.py``) and
match it, every ``revcol.xxx`` name they cite exists under the current module layout, and the variant builders'
docstrings are written from the variants table."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

import revcol
from revcol import _legacy, factory
from revcol.cli import info
from revcol.core.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "docs" / "generate.py"

# Where each table of facts is shown. A page that pasted a table instead of marking a block would pass the drift
# check, so the blocks themselves are required.
EXPECTED_BLOCKS = {
    "variants": {"docs/pytorch.md"},
    "weights": {"README.md", "docs/weights.md", "docs/pytorch.md"},
    "downstream": {"docs/downstream-weights.md"},
    "downstream-summary": {"README.md"},
    "configs": {"docs/tasks.md"},
    "layout": {"docs/ultralytics.md"},
    "options": {"docs/ultralytics.md"},
    "releases": {"docs/ultralytics.md"},
    "config": {"README.md", "docs/design.md"},
    "requirements": {"README.md"},
    "huge-per-rank": {"docs/scaling.md"},
    "memory": {"README.md", "docs/scaling.md"},
    "api": {"docs/api.md"},
    "results": {"docs/benchmarks.md"},
}

NAME = re.compile(r"(?<![\w./-])revcol(?:\.[A-Za-z_]\w*)+(?![\w<])")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
# A paragraph that says it is about the old module paths may name them.
ABOUT_OLD_PATHS = re.compile(r"alias|earlier release|old path", re.I)


@pytest.fixture(scope="module")
def generate():
    if not GENERATOR.is_file():
        pytest.skip("docs/ is not part of this installation")
    spec = importlib.util.spec_from_file_location("revcol_docs_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_pages(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for page in (ROOT / "docs").glob("*.md"):
        shutil.copy(page, tmp_path / "docs" / page.name)
    return tmp_path


# --------------------------------------------------------------------------- generated tables


def test_no_page_drifted_from_the_data(generate, capsys):
    assert generate.main(["--check"]) == 0, capsys.readouterr().err


def test_the_fact_tables_are_generated_blocks(generate):
    found: dict[str, set[str]] = {}
    for page in generate.pages():
        for line in page.read_text().splitlines():
            match = generate.START.match(line)
            if match:
                found.setdefault(match.group(1), set()).add(str(page.relative_to(ROOT)))
    assert set(EXPECTED_BLOCKS) == set(generate.BLOCKS), "every kind of block is placed somewhere"
    for name, where in EXPECTED_BLOCKS.items():
        assert where <= found.get(name, set()), name


def test_every_public_module_with_public_names_has_its_api_table(generate):
    """docs/api.md lists each public module's ``__all__``: a module that gains one gains a table there."""
    package = Path(revcol.__file__).parent
    public = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts) and re.search(r"^__all__ = ", path.read_text(), re.M):
            public.add(".".join(parts))
    page = (ROOT / "docs" / "api.md").read_text()
    assert public == set(re.findall(r"^<!-- generated: api (\S+) -->$", page, re.M))
    table = generate.api("revcol.distributed")
    assert "| `shard(model, *, mesh=None, mixed_precision=False, reshard_after_forward=True)` | Apply FSDP2" in table
    assert " at 0x" not in generate.api("revcol.weights")  # a default's address is no part of the page


def test_the_check_names_a_drifted_page_and_the_generator_repairs_it(generate, tmp_path, monkeypatch, capsys):
    root = _copy_pages(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert "| 82.2 |" in text  # revcol_tiny's top-1, inside the generated weights table
    readme.write_text(text.replace("| 82.2 |", "| 82.3 |", 1))
    assert generate.drifted(root) == [readme]

    monkeypatch.setattr(generate, "ROOT", root)
    assert generate.main(["--check"]) == 1
    assert "README.md: drifted" in capsys.readouterr().err
    assert "| 82.3 |" in readme.read_text()  # --check changes nothing
    assert generate.main([]) == 0
    assert readme.read_text() == text
    assert generate.main(["--check"]) == 0


def test_a_malformed_block_is_an_error_naming_its_line(generate):
    with pytest.raises(ValueError, match=r"page:1: unknown generated block 'nope'; known: variants"):
        generate.regenerate("<!-- generated: nope -->\n<!-- end generated -->\n")
    with pytest.raises(ValueError, match=r"page:2: block 'layout' has no '<!-- end generated -->'"):
        generate.regenerate("text\n<!-- generated: layout -->\n| stale |\n")
    stale = "a\n<!-- generated: layout -->\n| stale |\n<!-- end generated -->\nb\n"
    fresh = generate.regenerate(stale)
    assert fresh.startswith("a\n<!-- generated: layout -->\n\n| index | layer | output |")
    assert fresh.endswith("\n\n<!-- end generated -->\nb\n") and "stale" not in fresh


def test_the_markdown_tables_are_the_tables_revcol_info_prints():
    def md_rows(table: str) -> list[list[str]]:
        lines = [line for line in table.splitlines() if line.startswith("| ")][2:]
        return [[cell.strip().replace("`", "") for cell in line.strip("|").split("|")] for line in lines]

    def text_rows(table: str) -> list[list[str]]:
        return [line.split() for line in table.splitlines() if line.startswith("revcol_")]

    names = ["revcol_tiny", "revcol_huge"]
    md = md_rows(info.variant_table(names, 224, markdown=True))
    assert [row[:4] + row[5:] for row in md] == text_rows(info.variant_table(names, 224))
    assert [row[4] for row in md] == [f"{VARIANTS[name].drop_path:g}" for name in names]
    md = md_rows(info.weights_table(["revcol_small"], markdown=True, downstream=False))
    assert md == [["revcol_small", "in1k (default)", "revcol_small_1k.pth", "224", "83.5", "1000"]]
    assert "cached" not in info.weights_table(list(VARIANTS), markdown=True)  # nothing of this machine


@pytest.mark.parametrize("table", ["configs_table", "layout_table", "options_table", "releases_table"])
def test_the_tables_of_words_are_the_tables_revcol_info_prints(table):
    """Tables whose cells hold words: the text table's columns are two or more spaces apart."""
    make = getattr(info, table)
    md = [line for line in make(markdown=True).splitlines() if line.startswith("| ")][2:]
    md_rows = [[cell.strip().replace("`", "") for cell in line.strip("|").split(" | ")] for line in md]
    text = make().splitlines()[2 : 2 + len(md_rows)]
    assert md_rows == [[cell.replace("`", "") for cell in re.split(r" {2,}", line)] for line in text]


# --------------------------------------------------------------------------- names the pages cite


def _paragraphs(text: str) -> list[str]:
    """Code blocks whole, other text split at blank lines, table rows one by one."""
    blocks = FENCED.findall(text)
    prose = FENCED.sub("\n\n", text)
    parts = [p for p in re.split(r"\n\s*\n", prose) if p.strip()]
    return blocks + [row for part in parts for row in (part.splitlines() if part.startswith("|") else [part])]


def cited_names(text: str) -> list[tuple[str, bool]]:
    """Each ``revcol.xxx`` name written as code in ``text``, and whether its paragraph is about the old paths."""
    found = []
    for paragraph in _paragraphs(text):
        about_old = bool(ABOUT_OLD_PATHS.search(paragraph))
        spans = [paragraph] if paragraph.startswith("```") else re.findall(r"`([^`\n]+)`", paragraph)
        found += [(name, about_old) for span in spans for name in NAME.findall(span)]
    return found


def name_problem(name: str, about_old: bool) -> str | None:
    """Why ``name`` may not be cited, or ``None``: an old module path (outside a paragraph about them), or nothing."""
    old = next((o for o in _legacy.MOVED if name == o or name.startswith(o + ".")), None)
    if old is not None and not about_old:
        return f"{old} is an old module path; its names moved to {', '.join(_legacy.MOVED[old])}"
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(value, attr):
                return f"{'.'.join(parts[:i])} has no {'.'.join(parts[i:])}"
            value = getattr(value, attr)
        return None
    return "no such module"


def test_every_cited_name_exists_under_the_current_layout():
    problems = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, about_old in cited_names(page.read_text()):
            problem = name_problem(name, about_old)
            if problem:
                problems.append(f"{page.relative_to(ROOT)}: `{name}`: {problem}")
    assert problems == []


def test_the_name_check_finds_old_paths_and_missing_names():
    text = (
        "Use `revcol.core.network.parameter_count`, not `revcol.model.parameter_count` or `revcol.lr_decay`;\n"
        "`revcol.core.network.no_such_name` and `revcol.nowhere` do not exist, `rtdetr-revcol.yaml` is a file.\n\n"
        "```python\nfrom revcol.trainers import RevColDetectionTrainer\nrevcol.revcol_small()\n```\n\n"
        "The aliases: `revcol.model` still imports.\n\n"
        "| `revcol.ultralytics.trainers.RevCol<Name>` | `revcol.hooks.HOOKS` |\n"
    )
    cited = cited_names(text)
    assert [name for name, _ in cited] == [
        "revcol.trainers",
        "revcol.revcol_small",
        "revcol.core.network.parameter_count",
        "revcol.model.parameter_count",
        "revcol.lr_decay",
        "revcol.core.network.no_such_name",
        "revcol.nowhere",
        "revcol.model",
        "revcol.ultralytics.trainers",
        "revcol.hooks.HOOKS",
    ]
    problems = {name: name_problem(name, about_old) for name, about_old in cited}
    flagged = {name for name, problem in problems.items() if problem}
    assert flagged == {
        "revcol.trainers",
        "revcol.model.parameter_count",
        "revcol.lr_decay",
        "revcol.core.network.no_such_name",
        "revcol.nowhere",
        "revcol.hooks.HOOKS",
    }
    assert "moved to revcol.core.param_groups" in problems["revcol.lr_decay"]


# --------------------------------------------------------------------------- the variant builders


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_builder_is_a_function_documented_from_the_table(name):
    builder = getattr(revcol, name)
    assert builder is getattr(factory, name)
    assert inspect.isfunction(builder)
    assert (builder.__name__, builder.__qualname__, builder.__module__) == (name, name, "revcol.factory")
    assert pickle.loads(pickle.dumps(builder)) is builder
    signature = inspect.signature(builder)
    assert [p.kind for p in signature.parameters.values()] == [inspect.Parameter.VAR_KEYWORD]
    assert signature.return_annotation in (revcol.FullNet, "FullNet")

    spec = VARIANTS[name]
    with torch.device("meta"):
        model = builder()
    params = sum(p.numel() for p in model.parameters())
    doc = builder.__doc__
    assert factory.variant_summary(name) in doc and "build_variant" in doc
    assert f"{params / 1e6:.1f} M parameters" in doc
    assert f"channels {'-'.join(map(str, spec.channels))}, depths {'-'.join(map(str, spec.layers))}" in doc
    assert f"{spec.num_subnet} columns" in doc and ("level 0 also reads level 3" in doc) == spec.level0_from_coarsest


def test_every_variant_has_its_builder():
    builders = {name for name, value in vars(factory).items() if inspect.isfunction(value) and name in VARIANTS}
    assert builders == set(VARIANTS)
