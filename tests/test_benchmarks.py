"""Smoke test of the benchmark suite (``python -m benchmarks.run --quick``): it runs and reports; no timing
assertions."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from revcol.diagnostics import relative_error


@pytest.fixture(scope="module")
def bench():
    """The ``benchmarks`` package (beside ``src``: pytest's ``pythonpath`` puts the repository root on sys.path)."""
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as error:
        if error.name != "benchmarks":
            raise
        pytest.skip("benchmarks/ is not part of this installation")


@pytest.fixture(scope="module")
def harness(bench):
    return importlib.import_module("benchmarks.harness")


def test_quick_run_writes_a_table_and_a_plot(bench, tmp_path):
    threads = torch.get_num_threads()
    results, plot = tmp_path / "results.md", tmp_path / "benchmark.png"
    try:
        text = bench.main(["--quick", "--repeats", "1", "--results", str(results), "--plot", str(plot)])
    finally:
        torch.set_num_threads(threads)
    assert results.read_text() == text
    assert "Command: `python -m benchmarks.run --quick --repeats 1 --results" in text
    assert "| metric | goal | measured | met |" in text
    sections = (
        "construction",
        "exactness",
        "memory",
        "footprint",
        "train",
        "eval",
        "sizes",
        "scaling",
        "compile",
        "profile",
    )
    for section in (*sections, "cuda"):
        assert f"### {section}" in text
    assert "now against before: max relative difference 0.0e+00" in text  # multiples of 32: bit-identical
    rows = ("fp32 grad rel. error", "saved MB, reversible", "train step: baseline rev / ours rev", "eval 64x64")
    for row in (*rows, "revcol_tiny rev vs convnext_tiny", "RT-DETR RevCol-S rev vs ResNet-50"):
        assert row in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_reads_the_variant_from_the_library(harness):
    import revcol

    cfg = harness.Config()
    spec = revcol.VARIANTS["revcol_small"]
    assert (cfg.channels, cfg.layers, cfg.columns, cfg.drop_path) == (
        spec.channels,
        spec.layers,
        spec.num_subnet,
        spec.drop_path,
    )
    assert cfg.name == "revcol_small shape"
    assert harness.QUICK.name == "tiny (smoke)" and harness.QUICK.smoke


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
        assert max(relative_error(grads[n], ref[n]) for n in ref) < 1e-9, (type(model).__name__, mode)


def test_unknown_section_is_an_error(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--sections", "nope", "--no-write"])
    assert "unknown section" in capsys.readouterr().err


def test_device_section_code_path_on_cpu(harness):
    """The CUDA section's step loop (skipped without a GPU) also runs on the CPU: exercise it there."""
    device_steps = importlib.import_module("benchmarks.sections.cuda").device_steps
    cfg = dataclasses.replace(harness.QUICK, repeats=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = device_steps(cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert set(steps.results) == {(m, p) for m in ("plain", "rev") for p in ("fp32", "bf16 autocast")}
    assert sum(line.startswith("| rev |") for line in steps.lines) == 2
