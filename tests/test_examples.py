"""The scripts in examples/: each runs with --quick offline and prints what it claims; the gradient check can fail."""

from __future__ import annotations

import importlib.util
import math
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from revcol_helpers import revcol_env

from revcol.distributed.fsdp import cpu_fsdp_supported

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("train_rtdetr", "backbone", "check_gradients", "train_fsdp")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"revcol_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an example as a user would, from an empty folder, offline, with network attempts logged."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=tmp_path,
        env=revcol_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    log = tmp_path / "network.log"
    assert not log.exists(), f"network access attempted:\n{log.read_text()}"
    return result


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_docstring(name, capsys):
    module = load_example(name)
    assert "Run:" in module.__doc__ and "--quick" in module.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_backbone_quick(tmp_path):
    out = run_example("backbone", tmp_path, "--quick").stdout
    # feature_info agrees with the shapes: 64x64 input, strides 4-32, channels 16-128.
    for level, (channels, side) in enumerate([(16, 16), (32, 8), (64, 4), (128, 2)]):
        expected = f"c{level}: (2, {channels}, {side}, {side})  channels {channels}  reduction {64 // side}"
        assert expected in out, out
    assert "outputs identical: True" in out, out
    kept = {m[0]: float(m[1]) for m in re.findall(r"save_memory=(\w+)\s+kept for backward\s+([\d.]+) MB", out)}
    assert set(kept) == {"True", "False"}, out
    assert kept["True"] < kept["False"] / 2, out  # reversible columns keep far fewer activations
    assert list(tmp_path.glob("*.pth")) == []  # the round-trip checkpoint lives in a temporary folder


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-9), ("float32", 1e-5)])
def test_check_gradients_quick(tmp_path, dtype, tol):
    out = run_example("check_gradients", tmp_path, "--quick", "--dtype", dtype).stdout
    worst = float(re.search(r"worst relative error: (\S+)", out)[1])
    assert worst <= tol, out
    assert f"tolerance {tol:.1e}" in out and "OK" in out, out
    assert int(re.search(r"(\d+) gradients compared", out)[1]) > 100  # every parameter plus the input


def test_compare_gradients_detects_differences():
    compare = load_example("check_gradients").compare_gradients
    generator = torch.Generator().manual_seed(0)
    plain = {name: torch.randn(4, 5, generator=generator, dtype=torch.float64) for name in ("a.weight", "b", "input")}
    plain["zero"] = torch.zeros(3, dtype=torch.float64)  # e.g. the first column's alphas
    same = {name: g.clone() for name, g in plain.items()}
    assert max(compare(same, plain).values()) == 0

    perturbed = dict(same, b=same["b"] * (1 + 1e-6))  # one gradient off by a relative 1e-6
    errors = compare(perturbed, plain)
    assert errors["b"] == pytest.approx(1e-6, rel=1e-3)
    assert max(errors, key=errors.get) == "b" and errors["input"] == 0

    assert compare(dict(same, zero=torch.full((3,), 1e-3, dtype=torch.float64)), plain)["zero"] > 1e-9  # absolute
    assert math.isinf(compare({k: v for k, v in same.items() if k != "b"}, plain)["b"])  # missing gradient
    assert math.isinf(compare(dict(same, b=same["b"].reshape(5, 4)), plain)["b"])  # wrong shape
    assert math.isinf(compare(dict(same, input=same["input"] * math.nan), plain)["input"])  # NaN


def test_check_gradients_exits_nonzero_on_a_wrong_gradient(monkeypatch, capsys, torch_single_thread):
    module = load_example("check_gradients")
    original = module.gradients

    def broken(model, x, save_memory, seed=0):
        grads = original(model, x, save_memory, seed)
        if save_memory:  # as if the reversible backward got one weight's gradient slightly wrong
            name = next(n for n in grads if n.endswith("gamma"))
            grads[name][0] += 1e-6 * grads[name].norm()
        return grads

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


def test_train_rtdetr_quick(tmp_path):
    project = tmp_path / "runs"
    out = run_example("train_rtdetr", tmp_path, "--quick", "--project", str(project)).stdout
    best = project / "train" / "weights" / "best.pt"
    assert best.is_file()
    assert f"best weights: {best}" in out, out
    assert re.search(r"validation of best\.pt: mAP50 [\d.]+", out), out
    assert (project / "dataset" / "data.yaml").is_file()  # --quick with --project keeps the dataset there
    assert re.search(r"predictions: 4 images, \d+ boxes", out), out
    annotated = sorted(p.stem for p in (project / "train-predict").iterdir())
    assert annotated == ["000000", "000001", "000002", "000003"]  # the four synthetic test images
    assert not (project / "detect").exists()  # everything went under --project


def test_train_rtdetr_quick_default_project(tmp_path):
    # Without --project Ultralytics writes under its runs_dir setting, which defaults to the git root of the
    # Ultralytics installation (this checkout, for its .venv); point it into tmp_path first.
    runs_dir = tmp_path / "default-runs"
    code = f"from ultralytics.utils import SETTINGS; SETTINGS.update(runs_dir={str(runs_dir)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=revcol_env(tmp_path), check=True, timeout=120)
    out = run_example("train_rtdetr", tmp_path, "--quick").stdout
    best = Path(re.search(r"best weights: (.+)", out)[1])
    assert best.is_file() and best.is_relative_to(runs_dir / "detect"), out
    dataset = Path(re.search(r"synthetic dataset: (.+)", out)[1])
    assert not dataset.exists(), out  # the temporary dataset is removed at the end


def _torchrun_example(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 examples/<name>.py ...`` from an empty folder, offline, gloo on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    return subprocess.run(
        [sys.executable, *launch, "--master-port", str(port), str(EXAMPLES / f"{name}.py"), *args],
        cwd=tmp_path,
        env=revcol_env(tmp_path) | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
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
