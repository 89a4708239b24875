"""Smoke test of the benchmark suite (benchmarks/run.py --quick): it runs and reports; no timing assertions."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/run.py as a module; loading it puts benchmarks/ on sys.path for its sibling modules."""
    if not (BENCHMARKS / "run.py").is_file():
        pytest.skip("benchmarks/ is not part of this installation")
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("revcol_benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "")).startswith(str(BENCHMARKS))]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def harness(bench):
    return importlib.import_module("harness")


def test_quick_run_writes_a_table_and_a_plot(bench, tmp_path):
    threads = torch.get_num_threads()
    results, plot = tmp_path / "results.md", tmp_path / "benchmark.png"
    try:
        text = bench.main(["--quick", "--repeats", "1", "--results", str(results), "--plot", str(plot)])
    finally:
        torch.set_num_threads(threads)
    assert results.read_text() == text
    assert "| metric | goal | measured | met |" in text
    sections = ("construction", "exactness", "memory", "footprint", "train", "eval", "scaling", "compile", "profile")
    for section in (*sections, "cuda"):
        assert f"### {section}" in text
    rows = ("fp32 grad rel. error", "saved MB, reversible", "train step: baseline rev / ours rev", "eval 64x64")
    for row in (*rows, "revcol_tiny rev vs convnext_tiny", "RT-DETR RevCol-S rev vs ResNet-50"):
        assert row in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_baseline_matches_the_library(harness):
    """The benchmark's reference model takes our state dict and computes the same outputs and gradients."""
    cfg = harness.QUICK
    ours = harness.layer_scale_(harness.build(cfg), 0.1).double()
    base = harness.build(cfg, "baseline").double()
    base.load_state_dict(ours.state_dict())
    assert [n for n, _ in base.named_parameters()] == [n for n, _ in ours.named_parameters()]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = harness.gradients(ours, x, "plain")
    for model, mode in ((ours, "rev"), (ours, "ckpt"), (base, "plain"), (base, "rev")):
        grads = harness.gradients(model, x, mode)
        assert max(harness.rel_err(grads[n], ref[n]) for n in ref) < 1e-9, (type(model).__name__, mode)


def test_unknown_section_is_an_error(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--sections", "nope", "--no-write"])
    assert "unknown section" in capsys.readouterr().err


def test_device_section_code_path_on_cpu(harness):
    """The CUDA section's step loop (skipped without a GPU) also runs on the CPU: exercise it there."""
    device_steps = importlib.import_module("sections.cuda").device_steps
    cfg = dataclasses.replace(harness.QUICK, repeats=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines, results = device_steps(cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {(m, p) for m in ("plain", "rev") for p in ("fp32", "bf16 autocast")}
    assert sum(line.startswith("| rev |") for line in lines) == 2
