"""``revcol.diagnostics``: the gradient comparison of the reversible path against plain autograd, and the saved-bytes
count, that the tests, ``examples/check_gradients.py``, ``examples/backbone.py`` and the benchmarks share."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import make_input, make_net

from revcol.diagnostics import SavedTensors, compare_gradients, gradients, randomize_

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_compare_gradients_detects_differences():
    compare = compare_gradients
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


def test_randomize_is_seeded_and_makes_every_term_count():
    a, b = make_net(randomize=False), make_net(randomize=False)
    assert randomize_(a, seed=3) is a
    randomize_(b, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    gammas = [p for n, p in a.named_parameters() if n.endswith("gamma")]
    alphas = torch.cat([p.flatten() for n, p in a.named_parameters() if ".alpha" in n or n.startswith("alpha")])
    assert all(p.abs().min() > 0.1 for p in gammas)  # not the init's 1e-6
    assert (alphas > 0).any() and (alphas < 0).any() and alphas.abs().min() >= 0.5 and alphas.abs().max() <= 1.5


def test_gradients_are_seeded_and_leave_an_outer_autocast_on():
    model = make_net(drop_path=0.5)
    x = make_input()
    outputs, first = gradients(model, x, save_memory=True, seed=4)
    _, again = gradients(model, x, save_memory=True, seed=4)
    _, other = gradients(model, x, save_memory=True, seed=5)
    assert len(outputs) == 4 and "input" in first and len(first) == len(list(model.parameters())) + 1
    assert max(compare_gradients(again, first).values()) == 0
    assert max(compare_gradients(other, first).values()) > 1e-3  # other drop-path draws
    float_model, float_x = make_net(num_subnet=1, dtype=torch.float32), make_input(dtype=torch.float32)
    outputs, _ = gradients(float_model, float_x, save_memory=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = gradients(float_model, float_x, save_memory=False)
        assert torch.is_autocast_enabled("cpu")
    assert not torch.equal(under_autocast[3], outputs[3])  # the forward ran in bfloat16


def test_saved_tensors_counts_each_storage_once_and_the_excluded_apart():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    saved = SavedTensors(exclude=[weight])
    with saved.recording():
        y = x @ weight  # saves x and weight
        z = (y * y).sum()  # saves y (twice, one storage)
    z.backward()
    assert saved.activation_bytes == x.nbytes + y.nbytes
    assert saved.total_bytes == x.nbytes + y.nbytes + weight.nbytes
    assert sorted(shape for _, shape in saved.storages.values()) == [(4, 8), (4, 8)]
