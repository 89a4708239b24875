"""numpy values in a checkpoint's metadata (revcol.checkpoints._numpy_meta, docs/reliability.md "Checkpoint files").

mmcv-era files hold numpy scalars and arrays in ``meta`` (a best score, a palette), written by numpy 1 or 2. They
read as inert placeholders, only inside revcol's own reads and only in the reading thread; a forged numpy dtype is
never rebuilt, a call beside numpy data is still refused, and nobody else's weights-only loads change.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import make_net
from helpers.processes import revcol_env

from revcol import CheckpointError
from revcol.checkpoints.backbone import read_backbone
from revcol.checkpoints.files import read_checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FORGE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch

    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray

    class ForgedDtype:
        def __reduce__(self):
            fields = {"a": (np.dtype("O"), 0)}
            return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), fields, 8, 1, 0x3D))

    class ForgedArray:
        def __reduce__(self):
            return (multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), ForgedDtype(), False, b"A" * 8))

    torch.save({"meta": {"x": ForgedArray()}, "state_dict": {"stem.0.bias": torch.ones(2)}}, sys.argv[1])
    """
)

SMALL_NUMPY_META = {"best_score": np.float64(0.5), "PALETTE": np.array([[1, 2, 3]], dtype=np.uint8)}


def _run(script: str, *args: object, workdir: Path) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter, with ``revcol_env(workdir)`` (Ultralytics' settings kept in ``workdir``)."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=revcol_env(workdir),
        check=False,
    )


@pytest.fixture(scope="module")
def forged(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("forged") / "forged.pth"
    result = _run(FORGE, path, workdir=path.parent)
    assert result.returncode == 0, result.stderr
    return path


def test_a_forged_numpy_dtype_neither_crashes_nor_is_rebuilt(forged, tmp_path):
    """Every revcol read of the file survives; another thread's plain weights-only load meanwhile refuses it."""
    script = textwrap.dedent(
        """
        import pickle, sys, threading
        import torch
        import revcol
        from revcol.checkpoints.backbone import load_pretrained, read_backbone

        path = sys.argv[1]
        print("read:", sorted(read_backbone(path)))
        real_load, inside, release = torch.load, threading.Event(), threading.Event()

        def paused_load(*args, **kwargs):  # holds revcol's read open while the main thread loads
            if threading.current_thread().name == "revcol-read":
                inside.set()
                release.wait(30)
            return real_load(*args, **kwargs)

        torch.load = paused_load
        reader = threading.Thread(target=read_backbone, args=(path,), name="revcol-read")
        reader.start()
        inside.wait(30)
        try:
            real_load(path, weights_only=True)
            print("plain load: accepted it")
        except pickle.UnpicklingError:
            print("plain load: refused it")
        release.set()
        reader.join(30)
        """
    )
    result = _run(script, forged, workdir=tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    said = [line for line in result.stdout.splitlines() if line.startswith(("read:", "plain load:"))]
    assert said == ["read: ['stem.0.bias']", "plain load: refused it"]


def test_numpy_metadata_becomes_placeholders_only_inside_revcols_reads(tmp_path):
    from revcol.checkpoints._numpy_meta import NumpyValue, PatchedFile, numpy_patches, reading

    zipped, legacy = tmp_path / "meta.pth", tmp_path / "legacy.pth"
    checkpoint = {"meta": SMALL_NUMPY_META, "state_dict": {"stem.0.bias": torch.ones(2)}}
    torch.save(checkpoint, zipped)
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    for path, mmap in [(zipped, False), (zipped, True), (legacy, False)]:
        assert set(read_checkpoint(path, mmap=mmap)) == {"stem.0.bias"}

    def load(patched: bool) -> dict:
        with legacy.open("rb") as file:
            patches = numpy_patches(file, count=4) if patched else []
            file.seek(0)
            return torch.load(io.BufferedReader(PatchedFile(file, patches)), weights_only=True)

    with reading():
        meta = load(patched=True)["meta"]
        assert all(type(value) is NumpyValue for value in meta.values())
        with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL numpy\."):
            load(patched=False)  # numpy's own names stay refused, even inside a read
        errors: list[BaseException] = []
        other = threading.Thread(target=lambda: _collect(errors, load, patched=True))  # another thread, meanwhile
        other.start()
        other.join(30)
        assert "only inside revcol's own reads" in str(errors)
    with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL NUMPY\."):
        load(patched=True)  # and after it


def _collect(errors: list[BaseException], function, *args, **kwargs) -> None:
    try:
        function(*args, **kwargs)
    except BaseException as error:  # handed to the test's thread
        errors.append(error)


def test_others_allow_list_entries_stay_and_concurrent_loads_all_succeed(tmp_path):
    """Ultralytics registers numpy's reconstructors for the process; revcol's reads never take them away."""
    try:
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    theirs = [(multiarray.scalar, f"{multiarray.__name__}.scalar"), (np.dtype, "numpy.dtype")]
    theirs += [type(np.dtype(np.float64))]
    before = torch.serialization.get_safe_globals()
    scalar_file = tmp_path / "scalar.pt"
    torch.save({"best": np.float64(0.5)}, scalar_file)
    ours = tmp_path / "meta.pth"
    torch.save({"meta": SMALL_NUMPY_META, "state_dict": {"stem.0.bias": torch.ones(2)}}, ours)
    torch.serialization.add_safe_globals(theirs)
    try:
        failures: list[BaseException] = []

        def theirs_loads() -> None:
            for _ in range(20):
                try:
                    torch.load(scalar_file, weights_only=True)
                except BaseException as error:  # collected, asserted below
                    failures.append(error)

        def ours_reads() -> None:
            for _ in range(20):
                read_checkpoint(ours)

        threads = [threading.Thread(target=f) for f in (theirs_loads, theirs_loads, ours_reads, ours_reads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert failures == []
        assert set(torch.serialization.get_safe_globals()) == {*before, *theirs}
        assert torch.load(scalar_file, weights_only=True)["best"] == 0.5
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# --------------------------------------------------------------------------- what real files' meta holds


MMCV_NUMPY_META = {
    "hook_msgs": {"best_score": np.float64(0.5), "best_epoch": np.int64(12)},  # an EvalHook's numbers
    "PALETTE": np.array([[120, 120, 120], [180, 120, 120]], dtype=np.uint8),  # a generated palette
    "flags": np.array([True, False]),
    "names": np.array(["wall", "building"]),
    "mixed": np.array([1, "road", None], dtype=object),  # elements pass weights-only loading one by one
}


def _numpy_1_names(data: bytes) -> bytes:
    """A legacy-format torch.save file as numpy 1 pickles it: reconstructors under numpy.core, not numpy._core."""
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("numpy_generation", [2, 1])
def test_numpy_scalars_and_arrays_in_meta_pass_weights_only_loading(tmp_path, numpy_generation):
    """What a real file's meta may hold beyond plain types: numpy values, written by numpy 1 or numpy 2."""
    backbone = {f"backbone.{k}": v for k, v in make_net().state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"meta": MMCV_NUMPY_META, "state_dict": backbone}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    if numpy_generation == 1:
        data = _numpy_1_names(data)
        assert b"cnumpy.core.multiarray\n" in data and b"cnumpy._core" not in data
    path = tmp_path / "cmr.pth"
    path.write_bytes(data)
    state = read_backbone(path)
    assert all(torch.equal(state[k.removeprefix("backbone.")], v) for k, v in backbone.items())
    zipped = tmp_path / "zip.pth"
    torch.save({"meta": MMCV_NUMPY_META, "state_dict": backbone}, zipped)
    assert set(read_backbone(zipped, mmap=True)) == set(state)


def test_a_read_leaves_torchs_allow_list_as_it_found_it(tmp_path):
    """revcol's numpy entries exist only during its reads; a bare entry of the same class the user added stays."""
    path = tmp_path / "cmr.pth"
    torch.save({"meta": MMCV_NUMPY_META, "state_dict": {"backbone.stem.0.bias": torch.ones(2)}}, path)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.dtype])
    try:
        assert set(read_backbone(path)) == {"stem.0.bias"}
        assert set(torch.serialization.get_safe_globals()) == {*before, np.dtype}
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


class _Call:
    """Pickles as a call of ``os.getpid`` (harmless, but not data): what a malicious file would do with os.system."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.mark.parametrize("where", ["top level", "in an object array"])
def test_a_call_beside_numpy_data_is_still_refused(tmp_path, where):
    path = tmp_path / "cmr.pth"
    meta = {"call": _Call()} if where == "top level" else {"calls": np.array([1, _Call()], dtype=object)}
    torch.save({"meta": {**MMCV_NUMPY_META, **meta}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"refused by weights-only loading \(.*getpid"):
        read_backbone(path)
