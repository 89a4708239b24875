"""The Ultralytics releases revcol supports (``revcol.ultralytics.releases``): the range its package metadata
declares, and ``register()`` refusing any other."""

from __future__ import annotations

import pytest
import ultralytics

import revcol
from revcol.ultralytics import releases


def test_supported_range_is_the_one_in_the_package_metadata():
    import importlib.metadata

    declared = next(r for r in importlib.metadata.requires("revcol") if r.startswith("ultralytics") and "<" in r)
    assert declared == f"ultralytics{releases.supported_ultralytics()}"
    from ultralytics.utils.checks import check_version

    assert check_version(ultralytics.__version__, releases.supported_ultralytics())


@pytest.mark.parametrize("version", ["9.1.0", "8.4.66"])
def test_unsupported_ultralytics_version_is_refused(monkeypatch, version):
    revcol.unregister()
    monkeypatch.setattr(ultralytics, "__version__", version)
    try:
        with pytest.raises(RuntimeError, match=rf"{releases.supported_ultralytics()}.*{version}"):
            revcol.register()
        assert not revcol.is_registered()
    finally:
        monkeypatch.undo()
        revcol.register()
