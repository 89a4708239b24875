"""The scripts in examples/: each runs with --quick offline and prints what it claims; the gradient check can fail.

The quick runs of all but ``train_fsdp`` (which ``torchrun`` launches) share one fresh interpreter: ``QUICK_RUNS``
runs each script as ``__main__`` with its arguments, in a folder of its own, offline, with network attempts logged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from helpers.processes import free_port, revcol_env

from revcol import diagnostics
from revcol.distributed.fsdp import cpu_fsdp_supported

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("train_rtdetr", "backbone", "check_gradients", "train_fsdp", "train_mask_rcnn")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"revcol_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each run: the script run as __main__ with its command line, from its own empty folder (the run's name), its
# output and exit status written to <name>.json beside that folder.
DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
from pathlib import Path
for run in json.loads(sys.argv[1]):
    folder = Path(run["folder"])
    folder.mkdir(parents=True)
    os.chdir(folder)
    sys.argv = [run["script"], *run["args"]]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(run["script"], run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    report = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    folder.with_suffix(".json").write_text(json.dumps(report))
"""
# name: script, arguments ({folder}: the run's folder)
QUICK_RUNS = {
    "backbone": ("backbone", ["--quick"]),
    "check_gradients-float64": ("check_gradients", ["--quick", "--dtype", "float64"]),
    "check_gradients-float32": ("check_gradients", ["--quick", "--dtype", "float32"]),
    "train_rtdetr": ("train_rtdetr", ["--quick", "--project", "{folder}/runs"]),
    "train_rtdetr-default-project": ("train_rtdetr", ["--quick"]),
    "train_mask_rcnn": ("train_mask_rcnn", ["--quick"]),
}
# Where a run without --project writes: Ultralytics' runs_dir setting, by default the git root of the Ultralytics
# installation (this checkout, for its .venv). Set before the driver starts: older releases read it at import.
DEFAULT_RUNS = "train_rtdetr-default-project/default-runs"


@dataclass
class QuickRun:
    folder: Path  # the run's working directory
    stdout: str


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, QuickRun]:
    """Every run of QUICK_RUNS, in one fresh interpreter, offline, with network attempts logged (``revcol_env``)."""
    root = tmp_path_factory.mktemp("examples")
    runs = [
        {"folder": str(root / name), "script": str(EXAMPLES / f"{script}.py"),
         "args": [arg.format(folder=root / name) for arg in args]}
        for name, (script, args) in QUICK_RUNS.items()
    ]  # fmt: skip
    env = revcol_env(root)
    settings = f"from ultralytics.utils import SETTINGS; SETTINGS.update(runs_dir={str(root / DEFAULT_RUNS)!r})"
    subprocess.run([sys.executable, "-c", settings], cwd=root, env=env, check=True, capture_output=True, timeout=120)
    command = [sys.executable, "-c", DRIVER, json.dumps(runs)]
    driver = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    log = root / "network.log"
    assert not log.exists(), f"network access attempted:\n{log.read_text()}"
    results = {}
    for name in QUICK_RUNS:
        report = json.loads((root / f"{name}.json").read_text())
        assert report["code"] == 0, f"{name}: exit {report['code']}\n{report['stdout']}\n{report['stderr']}"
        results[name] = QuickRun(root / name, report["stdout"])
    return results


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_docstring(name, capsys):
    module = load_example(name)
    assert "Run:" in module.__doc__ and "--quick" in module.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_backbone_quick(quick_runs):
    run = quick_runs["backbone"]
    out = run.stdout
    # feature_info agrees with the shapes: 64x64 input, strides 4-32, channels 16-128.
    for level, (channels, side) in enumerate([(16, 16), (32, 8), (64, 4), (128, 2)]):
        expected = f"c{level}: (2, {channels}, {side}, {side})  channels {channels}  reduction {64 // side}"
        assert expected in out, out
    assert "outputs identical: True" in out, out
    kept = {m[0]: float(m[1]) for m in re.findall(r"save_memory=(\w+)\s+kept for backward\s+([\d.]+) MB", out)}
    assert set(kept) == {"True", "False"}, out
    assert kept["True"] < kept["False"] / 2, out  # reversible columns keep far fewer activations
    assert list(run.folder.glob("*.pth")) == []  # the round-trip checkpoint lives in a temporary folder


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-9), ("float32", 1e-5)])
def test_check_gradients_quick(quick_runs, dtype, tol):
    out = quick_runs[f"check_gradients-{dtype}"].stdout
    worst = float(re.search(r"worst relative error: (\S+)", out)[1])
    assert worst <= tol, out
    assert f"tolerance {tol:.1e}" in out and "OK" in out, out
    assert int(re.search(r"(\d+) gradients compared", out)[1]) > 100  # every parameter plus the input


def test_check_gradients_exits_nonzero_on_a_wrong_gradient(monkeypatch, capsys, torch_single_thread):
    module = load_example("check_gradients")
    assert module.compare_gradients is diagnostics.compare_gradients  # tests/test_diagnostics.py tests that one
    original = module.gradients

    def broken(model, x, *, save_memory, seed=0):
        outputs, grads = original(model, x, save_memory=save_memory, seed=seed)
        if save_memory:  # as if the reversible backward got one weight's gradient slightly wrong
            name = next(n for n in grads if n.endswith("gamma"))
            grads[name][0] += 1e-6 * grads[name].norm()
        return outputs, grads

    monkeypatch.setattr(module, "gradients", broken)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--quick"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.err and "gamma" in captured.out


def test_train_rtdetr_requires_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("train_rtdetr").parse_args([])
    assert exit_info.value.code == 2
    assert "--data is required" in capsys.readouterr().err


def test_train_rtdetr_quick(quick_runs):
    run = quick_runs["train_rtdetr"]
    project, out = run.folder / "runs", run.stdout
    best = project / "train" / "weights" / "best.pt"
    assert best.is_file()
    assert f"best weights: {best}" in out, out
    assert re.search(r"validation of best\.pt: mAP50 [\d.]+", out), out
    assert (project / "dataset" / "data.yaml").is_file()  # --quick with --project keeps the dataset there
    assert re.search(r"predictions: 4 images, \d+ boxes", out), out
    annotated = sorted(p.stem for p in (project / "train-predict").iterdir())
    assert annotated == ["000000", "000001", "000002", "000003"]  # the four synthetic test images
    assert not (project / "detect").exists()  # everything went under --project


def test_train_rtdetr_quick_default_project(quick_runs):
    # Without --project Ultralytics writes under its runs_dir setting (DEFAULT_RUNS: set into the run's folder).
    run = quick_runs["train_rtdetr-default-project"]
    runs_dir, out = run.folder / "default-runs", run.stdout
    best = Path(re.search(r"best weights: (.+)", out)[1])
    assert best.is_file() and best.is_relative_to(runs_dir / "detect"), out
    dataset = Path(re.search(r"synthetic dataset: (.+)", out)[1])
    assert not dataset.exists(), out  # the temporary dataset is removed at the end


def test_train_mask_rcnn_quick_losses_fall(quick_runs):
    out = quick_runs["train_mask_rcnn"].stdout
    steps = re.findall(r"step +(\d+)/20  loss ([\d.]+)  \(classifier [\d.]+, box_reg [\d.]+, mask [\d.]+, ", out)
    assert [int(step) for step, _ in steps] == list(range(1, 21)), out
    first, last = (float(x) for x in re.search(r"first 4 steps ([\d.]+), of the last 4 steps ([\d.]+)", out).groups())
    losses = [float(loss) for _, loss in steps]
    assert math.isclose(first, sum(losses[:4]) / 4, abs_tol=1e-3), out  # the means of the losses printed
    assert math.isclose(last, sum(losses[-4:]) / 4, abs_tol=1e-3), out
    assert last < 0.7 * first, out
    assert len(re.findall(r"held-out image \d: drawn \[.+\], predicted \[.*\] \(\d+ mask pixels\)", out)) == 4, out


def _torchrun_example(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 examples/<name>.py ...`` from an empty folder, offline, gloo on 127.0.0.1."""
    port = free_port()
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    return subprocess.run(
        [sys.executable, *launch, "--master-port", str(port), str(EXAMPLES / f"{name}.py"), *args],
        cwd=tmp_path,
        env=revcol_env(tmp_path) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,  # about 15 s a launch on 2 busy cores
    )


def test_train_fsdp_quick_trains_on_two_ranks_and_resumes(tmp_path):
    first = _torchrun_example("train_fsdp", tmp_path, "--quick", "--output", "runs")
    if not cpu_fsdp_supported():  # torch 2.6: the clear error of revcol.distributed.shard
        assert first.returncode != 0
        assert "FSDP2 on the CPU does not work with torch" in first.stdout + first.stderr
        return
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    losses = [float(x) for x in re.findall(r"epoch \d/2  loss ([\d.]+)", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out
    assert "done: revcol_tiny (revcol" in out and "2 ranks" in out, out
    assert sorted(p.name for p in (tmp_path / "runs").glob("epoch-*")) == ["epoch-1", "epoch-2"]
    assert sorted(p.name for p in (tmp_path / "runs" / "images").iterdir()) == ["class0", "class1"]

    again = _torchrun_example("train_fsdp", tmp_path, "--quick", "--output", "runs", "--epochs", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from runs/epoch-2 at epoch 2" in again.stdout, again.stdout
    assert "epoch 1/" not in again.stdout and "epoch 3/3  loss" in again.stdout, again.stdout
    assert not (tmp_path / "network.log").exists()
