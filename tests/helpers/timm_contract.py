"""Run timm's own model tests (``tests/test_models.py`` of a timm checkout) on the RevCol models.

Not part of the suite (it needs that file, which is not shipped here). Usage::

    python tests/helpers/timm_contract.py path/to/pytorch-image-models/tests/test_models.py [revcol_tiny ...]

timm's file parametrizes its tests over timm's model list when it is imported; this script instead calls the
test functions that apply to every CNN directly, with our names. ``revcol`` is imported first, so the names
are registered. A skipped test (timm's size limits) counts as skipped; any other exception fails the run.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback

import pytest
import torch

import revcol

TESTS = (  # (function, batch size) as timm parametrizes them
    ("test_model_forward", 1),
    ("test_model_backward", 2),
    ("test_model_default_cfgs", 1),
    ("test_model_forward_features", 1),
    ("test_model_forward_intermediates_features", 1),
    ("test_model_forward_intermediates", 1),
)
# Not run: test_model_forward_torchscript and the fx tests (RevCol is not scriptable or fx-traceable: the
# reversible autograd Function and the input checks), test_model_default_cfgs_non_std (transformers only).


def main(path: str, names: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(1)
    failures = 0
    for name in names or ["revcol_tiny"]:
        if name not in revcol.VARIANTS:
            raise SystemExit(f"{name} is not a RevCol variant; known: {', '.join(revcol.VARIANTS)}")
        for test, batch_size in TESTS:
            start = time.perf_counter()
            try:
                getattr(module, test)(name, batch_size)
                status = "passed"
            except pytest.skip.Exception as skip:
                status = f"skipped ({skip})"
            except Exception:  # report every failing test, not only the first
                status = "FAILED\n" + traceback.format_exc()
                failures += 1
            print(f"{test}[{name}-{batch_size}] {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
