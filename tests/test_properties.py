"""Property-based tests over random valid configurations (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import STRIDES, assert_close_per_tensor, make_input, make_net
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from revcol.diagnostics import gradients

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

configs = st.fixed_dictionaries(
    {
        "channels": st.lists(st.sampled_from([8, 16, 24, 32]), min_size=4, max_size=4),
        "layers": st.lists(st.integers(1, 3), min_size=4, max_size=4),
        "num_subnet": st.integers(1, 4),
        "kernel_size": st.sampled_from([3, 5, 7]),
        "drop_path": st.sampled_from([0.0, 0.3]),
        "h": st.sampled_from([32, 64, 96]),
        "w": st.sampled_from([32, 64, 96]),
        "n": st.integers(1, 2),
    }
)


@SETTINGS
@given(config=configs)
def test_output_shapes_width_list_and_reversible_gradients(config):
    h, w, n = config.pop("h"), config.pop("w"), config.pop("n")
    model = make_net(**config)
    channels = config["channels"]
    assert model.width_list == channels
    assert [f["reduction"] for f in model.feature_info] == list(STRIDES)

    x = make_input(n, h, w)
    with torch.no_grad():
        eval_out = model.eval()(x)
    plain_out, plain = gradients(model, x, save_memory=False, seed=9)
    rev_out, rev = gradients(model, x, save_memory=True, seed=9)

    expected = [(n, c, h // s, w // s) for c, s in zip(channels, STRIDES, strict=True)]
    for outputs in (eval_out, plain_out, rev_out):
        assert [tuple(o.shape) for o in outputs] == expected
    for a, e in zip(rev_out, plain_out, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert_close_per_tensor(rev, plain, tol=1e-9)


@SETTINGS
@given(
    values=st.lists(
        st.floats(-2e-3, 2e-3, allow_nan=False, allow_subnormal=True) | st.floats(-2.0, 2.0, allow_nan=False),
        min_size=1,
        max_size=16,
    )
)
def test_bounded_alpha_property(values):
    from revcol.core.network import ALPHA_BOUND, bounded_alpha

    for dtype in (torch.float32, torch.float64):
        alpha = torch.tensor(values, dtype=dtype)
        bounded = bounded_alpha(alpha)
        assert bool((bounded.abs() >= torch.tensor(ALPHA_BOUND, dtype=dtype)).all())
        # sign kept (zero counts positive); values already away from zero unchanged
        assert bool(((bounded > 0) == (alpha >= 0)).all())
        far = alpha.abs() >= ALPHA_BOUND
        assert torch.equal(bounded[far], alpha[far])
