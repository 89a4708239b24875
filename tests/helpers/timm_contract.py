"""Run timm's own model tests (``tests/test_models.py`` of a timm checkout or sdist) on the RevCol models.

Not part of the suite (it needs that file, which is not shipped here). Usage::

    python tests/helpers/timm_contract.py path/to/timm/tests/test_models.py [--feature-cls list] [revcol_tiny ...]

timm's file parametrizes its tests over timm's model list when it is imported; this script instead calls the
test functions that apply to every CNN directly, with our names. ``revcol`` is imported first, so the names
are registered. A skipped test (timm's size limits) counts as skipped, a test that the given file does not have
as absent; any other exception fails the run.

timm's feature tests build the default extractor (RevCol's: ``FeatureGetterNet``). ``--feature-cls NAME`` makes
them build another: timm's ``create_model`` gets ``feature_cls=NAME`` wherever a test asks for ``features_only``
without naming one, and timm's ``test_features_only_grad_checkpointing_backward`` runs too (timm's
``FeatureGetterNet`` has no ``set_grad_checkpointing``). Not "dict": timm's tests read the outputs as a list.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

import revcol

TESTS = (  # (function, batch size or None where timm's test takes none)
    ("test_model_forward", 1),
    ("test_model_backward", 2),
    ("test_model_default_cfgs", 1),
    ("test_model_forward_features", 1),
    ("test_model_forward_intermediates_features", 1),
    ("test_model_forward_intermediates", 1),
    ("test_features_only_feature_cls_class", None),
)
EXTRACTOR_TESTS = (("test_features_only_grad_checkpointing_backward", None),)
FEATURE_CLASSES = ("getter", "hook", "list")
# Not run: test_model_forward_torchscript and the fx tests (RevCol is not scriptable or fx-traceable: the
# reversible autograd Function and the input checks), test_model_default_cfgs_non_std (transformers only).


def _with_feature_cls(create_model: Callable[..., Any], feature_cls: str) -> Callable[..., Any]:
    def create(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("features_only"):
            kwargs.setdefault("feature_cls", feature_cls)
        return create_model(*args, **kwargs)

    return create


def _run(module: ModuleType, test: str, name: str, batch_size: int | None) -> tuple[str, bool]:
    """(status, failed) of one of timm's tests on model ``name``."""
    function = getattr(module, test, None)
    if function is None:
        return "absent from this test file", False
    args: list[Any] = [name] if batch_size is None else [name, batch_size]
    if "cfg_device" in function.__code__.co_varnames[: function.__code__.co_argcount]:
        # timm's fixture of that name: the meta device where torch has device contexts
        args.append("meta" if getattr(module, "_HAS_DEVICE_CONTEXT", False) else "cpu")
    try:
        function(*args)
    except pytest.skip.Exception as skip:
        return f"skipped ({skip})", False
    except Exception:  # report every failing test, not only the first
        return "FAILED\n" + traceback.format_exc(), True
    return "passed", False


def main(path: str, names: list[str], feature_cls: str | None = None) -> int:
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = TESTS
    if feature_cls is not None:
        module.create_model = _with_feature_cls(module.create_model, feature_cls)
        tests += EXTRACTOR_TESTS
    torch.set_num_threads(1)
    failures = 0
    for name in names or ["revcol_tiny"]:
        if name not in revcol.VARIANTS:
            raise SystemExit(f"{name} is not a RevCol variant; known: {', '.join(revcol.VARIANTS)}")
        for test, batch_size in tests:
            start = time.perf_counter()
            status, failed = _run(module, test, name, batch_size)
            failures += failed
            label = name if batch_size is None else f"{name}-{batch_size}"
            print(f"{test}[{label}] {status} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_file", help="timm's tests/test_models.py")
    parser.add_argument("names", nargs="*", help="RevCol variants (default: revcol_tiny)")
    parser.add_argument("--feature-cls", choices=FEATURE_CLASSES, help="the extractor timm's feature tests build")
    options = parser.parse_intermixed_args()
    raise SystemExit(main(options.test_file, options.names, options.feature_cls))
