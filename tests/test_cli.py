"""The ``revcol`` command (``revcol.cli``): the installed console script run as a user would (subprocesses in a
temporary folder), and ``main`` called in-process."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import ultralytics
from helpers.processes import revcol_env
from helpers.yamls import TINY_OPTIONS, TINY_RTDETR_YAML, revcol_row

from revcol.cli import HELP, help_text, info, main
from revcol.cli.commands import HELP_ALIASES
from revcol.demo import generate_dataset
from revcol.ultralytics import releases, yaml_rows

REVCOL = Path(sys.executable).with_name("revcol")


def revcol(*args: str, cwd: Path, timeout: float = 300, site: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script offline, with Ultralytics settings in ``cwd`` and network attempts logged;
    ``site``: a folder whose packages come first (``in_a_clone``'s Ultralytics)."""
    env = revcol_env(cwd)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return subprocess.run([str(REVCOL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def in_a_clone(clone: Path) -> Path:
    """The README's install as Ultralytics sees it: its package in a virtual environment inside a git checkout
    (``clone``, with a ``.git`` folder), here a copy of the installed package; returns the folder that holds it."""
    from ultralytics.utils.git import GitRepo

    (clone / ".git").mkdir(parents=True)
    site = clone / ".venv" / "lib" / "site-packages"
    shutil.copytree(Path(ultralytics.__file__).parent, site / "ultralytics")  # copy2: its bytecode stays valid
    assert GitRepo(site / "ultralytics" / "utils" / "git.py").root == clone  # where Ultralytics looks for its git
    return site


def no_network(cwd: Path) -> None:
    log = cwd / "network.log"
    assert not log.exists(), f"network access attempted:\n{log.read_text()}"


def test_console_script_is_installed():
    assert REVCOL.is_file(), f"{REVCOL} missing: pip install -e ."


def test_help(tmp_path):
    run = revcol("--help", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert HELP in run.stdout
    for text in ("revcol demo", "revcol info", "train, val, predict, export", "yolo help", "rtdetr-revcol.yaml"):
        assert text in run.stdout, text


HELP_ALONE = """
import importlib.util, sys, types
# The revcol package itself, standing in for its __init__ (which registers with Ultralytics): only cli's own imports
package = types.ModuleType("revcol")
package.__path__ = list(importlib.util.find_spec("revcol").submodule_search_locations)
sys.modules["revcol"] = package
from revcol.cli.commands import help_text
assert "Shipped model configs" in help_text()
print(sorted({name.partition(".")[0] for name in sys.modules} & {"torch", "timm", "ultralytics", "numpy", "cv2"}))
"""


def test_building_the_help_imports_no_torch_timm_or_ultralytics(tmp_path):
    """The help is written from data modules that import none of them (`import revcol` itself still does: it
    registers the backbones with Ultralytics)."""
    run = subprocess.run([sys.executable, "-c", HELP_ALONE], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]"]


@pytest.mark.parametrize("flag", sorted(HELP_ALIASES))
def test_every_help_flag_prints_help(flag, capsys):
    assert main([flag]) == 0
    assert capsys.readouterr().out == HELP


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out == HELP


def test_help_is_written_from_the_data():
    assert help_text() == HELP
    lines = HELP.splitlines()
    for name in yaml_rows.shipped_configs():  # each with its description (the YAML's first line), once
        config = info.shipped_config(name)
        listed = [line for line in lines if line.split()[:1] == [name]]
        assert len(listed) == 1 and config.description in listed[0], name
        release = releases.head_release(config.head)
        assert (f"(ultralytics>={release})" in listed[0]) == (release != releases.supported_floor()), name
    assert "(ultralytics>=8.4.104)" in next(line for line in lines if "yolo-revcol-depth.yaml" in line)
    layout = yaml_rows.LAYOUT
    assert f"expands into layers {layout[0].index}-{layout[-1].index}:" in HELP
    assert yaml_rows.LAYOUT_TEXT in lines  # the line a ConfigError about a row's layers prints
    assert yaml_rows.LAYOUT_TEXT.endswith(", ".join(f"{i} stride {4 * 2 ** (i - 1)}" for i in range(1, 5)))
    assert f"[-1, 1, {yaml_rows.CUSTOM_NAME}, [{yaml_rows.CUSTOM_EXAMPLE}]]" in HELP
    # measurements live in the benchmark results, not in the help text
    assert not re.search(r"\b(about|minutes?|seconds?|hours?|core)\b", HELP), HELP


def test_shipped_config_headers_describe_the_model_only():
    """Each shipped config's header is its one-line description and a pointer to `revcol info`: the layer layout
    and the Ultralytics releases are shown from the data, not restated in comments."""
    for name in yaml_rows.shipped_configs():
        lines = (yaml_rows.CONFIG_DIR / name).read_text().splitlines()
        header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
        config = info.shipped_config(name)
        assert header[0] == f"# {config.description}" and len(header) <= 2, name
        assert header[1:] == [
            "# Backbone layers, row options and the Ultralytics release each head needs: `revcol info`."
        ]
        assert not re.search(
            r"ultralytics>=|\b8\.4\.\d|layers \d-\d|\d = (stride|P\d)|\d stride \d", "\n".join(header), re.I
        ), name


@pytest.fixture(scope="module")
def info_output(tmp_path_factory) -> str:
    """What `revcol info` prints, with an empty weights cache (nothing cached here)."""
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(io.StringIO()) as out:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch")))
        assert main(["info"]) == 0
    return out.getvalue()


def test_info_table(info_output, tmp_path, monkeypatch, capsys):
    variants, published = info_output.split("\n\n")[:2]
    lines = {line.split()[0]: line.split() for line in variants.splitlines() if line.startswith("revcol_")}
    assert list(lines) == ["revcol_tiny", "revcol_small", "revcol_base", "revcol_large", "revcol_xlarge", "revcol_huge"]
    # params (M) as in the paper, and the columns
    assert [row[4] for row in lines.values()] == ["29.9", "60.1", "138.0", "272.1", "832.0", "2154.7"]
    assert lines["revcol_small"][1:4] == ["64-128-256-512", "2-2-4-2", "8"]
    assert "GFLOPs @224" in info_output
    # the authors' published weights, with the default of pretrained=True marked and none cached here
    rows = [line.split() for line in published.splitlines() if line.startswith("revcol_")]
    assert ["revcol_small", "in1k", "*", "revcol_small_1k.pth", "224", "83.5", "1000", "no"] in rows
    assert ["revcol_base", "in22k", "revcol_base_22k.pth", "224", "-", "21841", "no"] in rows
    assert ["revcol_huge", "megdata", "revcol_huge_megdata.pth", "224", "-", "-", "no"] in rows
    assert len(rows) == 11 and not any(row[0] == "revcol_xlarge" for row in rows)
    # GFLOPs grow with the square of the image size
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["info", "revcol_small", "--imgsz", "448"]) == 0
    small = capsys.readouterr().out
    row = next(line.split() for line in small.splitlines() if line.startswith("revcol_small"))
    assert float(row[5]) == pytest.approx(4 * float(lines["revcol_small"][5]), rel=0.02)
    assert "revcol_tiny" not in small


def test_info_prints_the_layout_the_options_and_the_releases(info_output):
    tables = [info.configs_table(), info.layout_table(), info.options_table(), info.releases_table()]
    assert info_output.endswith("\n\n".join(tables) + "\n")  # after the configs table, in this order
    layout = info.layout_table().splitlines()
    assert layout[0].split() == ["index", "layer", "output"]
    assert [line.split()[0] for line in layout[2:]] == [str(layer.index) for layer in yaml_rows.LAYOUT]
    assert "Index 0         stride 4 (P2)" in info.layout_table()
    options = info.options_table().splitlines()[2:]
    assert [line.split()[0] for line in options] == [option.name for option in yaml_rows.OPTIONS]
    assert "custom revcol rows, required" in next(line for line in options if line.startswith("channels "))
    needs = {line.split()[0]: line.split()[2] for line in info.releases_table().splitlines()[2:]}
    assert needs["Depth"] == f"ultralytics>={releases.head_release('Depth')}" == "ultralytics>=8.4.104"
    assert f"ultralytics{releases.supported_range()} (the supported range)" in info.releases_table()


def test_argument_errors_are_messages_not_tracebacks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "epochz=3"]) == 2
    out, err = capsys.readouterr()
    message = re.sub(r"\x1b\[[0-9;]*m", "", err)  # some Ultralytics releases colour the bad key
    assert "'epochz' is not a valid YOLO argument" in message and "epochs" in message
    assert "Traceback" not in out + err


def test_other_user_errors_are_messages_not_tracebacks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "model=no-such-rtdetr-revcol.yaml", "data=no-such-data.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("FileNotFoundError: ") and "no-such-rtdetr-revcol.yaml" in err

    (tmp_path / "bad-rtdetr.yaml").write_text(TINY_RTDETR_YAML.replace("layers: [1, 1, 1, 1], ", ""))
    assert main(["val", "model=bad-rtdetr.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ConfigError: ") and "needs channels, layers and num_subnet" in err
    assert not (tmp_path / "runs").exists()


def test_errors_from_bugs_keep_their_traceback(monkeypatch):
    from revcol.cli import commands

    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(commands, "_info", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["info"])


def test_info_of_a_model_yaml(monkeypatch, caplog, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    with caplog.at_level("INFO", logger="ultralytics"):
        assert main(["info", "rtdetr-revcol-demo.yaml", "--imgsz", "128"]) == 0  # a shipped config, by bare name
    out = caplog.text  # Ultralytics' summary is logged
    assert "rtdetr-revcol-demo summary:" in out and "875,093 parameters" in out and "GFLOPs" in out
    assert capsys.readouterr().out == info.layout_table() + "\n"  # and the layers its RevCol row expands into


def test_info_of_a_classify_yaml_prints_one_summary(tmp_path, capsys):
    from revcol import cli

    path = tmp_path / "cls-revcol.yaml"
    path.write_text(f"nc: 3\nbackbone:\n  - {revcol_row(TINY_OPTIONS)}\nhead:\n  - [-1, 1, Classify, [nc]]\n")
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


def test_info_unknown_variant(capsys):
    assert main(["info", "revcol_giant"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'revcol_giant'" in err and "revcol_small" in err


class Trained(NamedTuple):
    cwd: Path  # where the commands run, outside the clone
    clone: Path  # the git checkout that holds the virtual environment with Ultralytics
    site: Path  # the environment's packages
    run: subprocess.CompletedProcess  # the training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A 1-epoch ``revcol train`` of a tiny custom RevCol RT-DETR on a generated dataset, in a fresh folder, with
    Ultralytics in a virtual environment inside a git checkout (the README's install) and no ``project=``.

    The YAML is called ``mine.yaml``: the model is RT-DETR for its head, not for a name containing "rtdetr".
    """
    root = tmp_path_factory.mktemp("cli")
    cwd, clone = root / "work", root / "clone"
    site = in_a_clone(clone)
    data = generate_dataset(cwd / "shapes", n_train=8, n_val=4, imgsz=64, seed=0)
    (cwd / "mine.yaml").write_text(TINY_RTDETR_YAML)
    args = ["train", "model=mine.yaml", f"data={data}", "epochs=1", "imgsz=64", "batch=4"]
    return Trained(cwd, clone, site, revcol(*args, "workers=0", "plots=False", "device=cpu", cwd=cwd, site=site))


def test_train(trained):
    cwd, _, _, run = trained
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    save_dir = cwd / "runs" / "detect" / "train"
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "args.yaml"):
        assert (save_dir / name).is_file(), name
    with open(save_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and "metrics/mAP50(B)" in rows[0]
    assert "train/giou_loss" in rows[0]  # RT-DETR's trainer: its losses, not YOLO's box/dfl losses
    printed = run.stdout + run.stderr
    assert "RevColBackbone" in printed  # Ultralytics' model summary lists the backbone layer
    assert "1 epochs completed" in printed and str(save_dir) in printed
    assert f"Optimizer stripped from {save_dir / 'weights' / 'last.pt'}, " in printed  # the file, not its stand-in
    assert ".part" not in printed and "no model scale passed" not in printed
    no_network(cwd)


def test_predict_with_trained_weights(trained):
    cwd, _, site, _ = trained
    best = cwd / "runs" / "detect" / "train" / "weights" / "best.pt"
    source = cwd / "shapes" / "images" / "test"
    run = revcol("predict", f"model={best}", f"source={source}", "imgsz=64", "device=cpu", cwd=cwd, site=site)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    save_dir = cwd / "runs" / "detect" / "predict"
    saved = sorted(save_dir.glob("*.jpg"))  # Ultralytics saves annotated images as JPEG
    assert [p.stem for p in saved] == sorted(p.stem for p in source.glob("*.png"))
    assert all(p.stat().st_size > 0 for p in saved)
    assert "Results saved to" in run.stdout + run.stderr
    no_network(cwd)


def test_runs_are_saved_where_the_command_runs_and_the_settings_name_no_folder_of_the_clone(trained):
    """Ultralytics takes a git checkout above its package for its own: without revcol, runs would go into the clone
    and the settings file would keep its folders for every later project."""
    cwd, clone, site, _ = trained
    best = cwd / "runs" / "detect" / "train" / "weights" / "best.pt"
    data = cwd / "shapes" / "data.yaml"
    run = revcol("val", f"model={best}", f"data={data}", "imgsz=64", "batch=4", "device=cpu", cwd=cwd, site=site)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in (cwd / "runs" / "detect").iterdir()) == ["predict", "train", "val"]
    assert sorted(p.name for p in clone.iterdir()) == [".git", ".venv"]
    assert sorted(p.name for p in clone.parent.iterdir()) == ["clone", "work"]  # no datasets/ beside it either
    settings = json.loads((cwd / "ultralytics-config" / "Ultralytics" / "settings.json").read_text())
    folders = {key: settings[key] for key in ("runs_dir", "weights_dir", "datasets_dir")}
    assert not any(Path(folder).is_absolute() for folder in folders.values()), folders  # each under the working one
    no_network(cwd)


def test_info_lists_every_shipped_config(info_output):
    from revcol.ultralytics.yaml_rows import shipped_configs

    rows = {
        line.split()[0]: line.split()
        for line in info_output.splitlines()
        if line.split()[:1] and line.split()[0].endswith(".yaml")
    }
    assert {"yolo-revcol-sem.yaml", "yolo-revcol-depth.yaml", "yolo-revcol-p2.yaml", "rtdetr-revcol-p2.yaml"} <= set(
        shipped_configs()
    )
    assert sorted(rows) == shipped_configs()
    assert rows["yolo-revcol-sem.yaml"][1:4] == ["SemanticSegment", "11,8", "revcol_tiny"]
    assert rows["rtdetr-revcol-p2.yaml"][1:4] == ["RTDETRDecoder", "21,24,27,30", "revcol_tiny"]
    for name, row in rows.items():  # the description column: the config's own first line
        assert " ".join(row[4:]) == info.shipped_config(name).description, name


BAD_CUSTOM_ROWS = {
    "empty": ("[-1, 1, revcol, []]", r"missing \['channels', 'layers', 'num_subnet'\]"),
    "null": ("[-1, 1, revcol, null]", r"missing \['channels', 'layers', 'num_subnet'\]"),
    "empty-mapping": ("[-1, 1, revcol, [{}]]", r"missing \['channels', 'layers', 'num_subnet'\]"),
    "no-channels": ("[-1, 1, revcol, [{layers: [1, 1, 1, 1], num_subnet: 2}]]", r"missing \['channels'\]"),
    "three-items": ("[-1, 1, revcol]", r"has four items, \[from, repeats, module, args\].*got 3"),
}


def bad_yaml(tmp_path: Path, row: str) -> Path:
    """The tiny RT-DETR of the tests with its RevCol row replaced by ``row``."""
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_RTDETR_YAML.replace(TINY_RTDETR_YAML.splitlines()[2].strip("- ").split("  #")[0], row, 1))
    assert row in path.read_text()
    return path


def assert_one_message(out: str, err: str, match: str) -> None:
    assert "Traceback" not in out + err
    first = err.splitlines()[0]
    assert first.startswith("ConfigError: ") and re.search(match, first), err


def test_the_console_script_prints_a_bad_row_as_one_message(tmp_path):
    """The contract through the installed script: a bad row is one message and exit status 1, not a traceback."""
    row, match = BAD_CUSTOM_ROWS["three-items"]
    run = revcol("info", str(bad_yaml(tmp_path, row)), cwd=tmp_path)
    assert run.returncode == 1
    assert_one_message(run.stdout, run.stderr, match)


@pytest.mark.parametrize(("row", "match"), BAD_CUSTOM_ROWS.values(), ids=list(BAD_CUSTOM_ROWS))
def test_info_of_a_bad_custom_row_prints_the_config_error(tmp_path, monkeypatch, capsys, row, match):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    assert main(["info", str(bad_yaml(tmp_path, row))]) == 1
    assert_one_message(*capsys.readouterr(), match)
