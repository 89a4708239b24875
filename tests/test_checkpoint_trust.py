"""Reading and writing backbone checkpoints under attack and faults (docs/reliability.md, "Checkpoint files").

Crafted files: numpy metadata with a forged dtype, calls, ambiguous keys, sparse weights, bit rot, compressed
records. Faults: a SIGKILL at a random moment of ``save_backbone``, a full filesystem. Each test here failed on the
code before these guarantees (a segfault, a silent load, a truncated file, a misleading message).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from revcol_helpers import make_net, revcol_env

from revcol import CheckpointError
from revcol.checkpoints.backbone import read_backbone, save_backbone
from revcol.checkpoints.files import read_checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# A numpy array whose dtype state (set through numpy.dtype.__setstate__) claims an object field over 8 raw bytes
# that the file chooses: numpy would read them as a pointer. Written by a subprocess, as an attacker would.
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

NUMPY_META = {"best_score": np.float64(0.5), "PALETTE": np.array([[1, 2, 3]], dtype=np.uint8)}


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
    checkpoint = {"meta": NUMPY_META, "state_dict": {"stem.0.bias": torch.ones(2)}}
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
    torch.save({"meta": NUMPY_META, "state_dict": {"stem.0.bias": torch.ones(2)}}, ours)
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


def test_ambiguous_module_prefix_is_refused(source, tmp_path):
    state = source.state_dict()
    path = tmp_path / "both.pth"
    torch.save({**state, "module.stem.0.weight": torch.zeros_like(state["stem.0.weight"])}, path)
    with pytest.raises(CheckpointError, match=r"both 'stem\.0\.weight' and 'module\.stem\.0\.weight'.*ambiguous"):
        read_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_sparse_tensor_in_place_of_a_weight_is_a_clear_error(source, target, tmp_path):
    state = source.state_dict()
    state["stem.0.bias"] = state["stem.0.bias"].to_sparse()
    path = tmp_path / "sparse.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"stem\.0\.bias is a sparse_coo tensor; a weight must be a dense"):
        read_backbone(path)


def _flip_bytes(path: Path, record_suffix: str) -> None:
    """Overwrite 64 bytes inside one record's data, leaving the zip structure intact (bit rot on disk)."""
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_length + extra_length + 16
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mmap", [False, True])
def test_bit_rot_in_a_zip_checkpoint_is_detected(mmap, source, tmp_path):
    path = tmp_path / "rot.pth"
    torch.save(source.state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda r: r.file_size).filename
    _flip_bytes(path, largest)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt\): Bad CRC-32"):
        read_checkpoint(path, mmap=mmap)


def test_compressed_records_are_refused_with_or_without_mmap(source, tmp_path):
    """torch.save stores records; a deflated one would be mapped as its compressed bytes."""
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w") as dst:
        for record in src.infolist():
            dst.writestr(record.filename, src.read(record), compress_type=zipfile.ZIP_DEFLATED)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=r"record \S+ is compressed"):
            read_checkpoint(deflated, mmap=mmap)


def test_bit_rot_in_a_safetensors_file_of_save_backbone_is_detected(source, tmp_path):
    path = save_backbone(source, tmp_path / "backbone.safetensors")
    data = bytearray(path.read_bytes())
    data[-200:-136] = bytes(b ^ 0x5A for b in data[-200:-136])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256 recorded"):
        read_backbone(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize(("make", "kind"), [("fifo", "a FIFO"), ("device", "a character device")])
def test_a_symlink_to_a_fifo_or_device_is_named_for_what_it_points_to(make, kind, tmp_path):
    if make == "fifo":
        os.mkfifo(tmp_path / "pipe")
        target = tmp_path / "pipe"
    else:
        target = Path(os.devnull)
    link = tmp_path / "weights.pth"
    link.symlink_to(target)
    with pytest.raises(CheckpointError, match=f"is a symbolic link to {kind}.*not a regular file"):
        read_checkpoint(link)
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a broken symbolic link"):
        read_checkpoint(tmp_path / "dangling.pth")


# Saves the same backbone over and over, its weights filled with the round number, until killed.
SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import torch
    from revcol import FullNet
    from revcol.checkpoints.backbone import save_backbone

    path = sys.argv[1]
    model = FullNet(channels=(32, 64, 96, 128), layers=(1, 1, 2, 1), num_subnet=3)
    for round in range(1, 10**6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(round)
        save_backbone(model, path)
        if round == 1:
            print("saved", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_backbone_killed_at_random_moments_leaves_a_whole_file(suffix, tmp_path):
    rng = random.Random(suffix)
    path = tmp_path / f"backbone{suffix}"
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True, env=revcol_env(tmp_path)
        ) as process:
            while (line := process.stdout.readline()) and line.strip() != "saved":  # past Ultralytics' notices
                pass
            assert line.strip() == "saved"
            threading.Event().wait(rng.uniform(0.05, 0.6))
            process.kill()
        state = read_checkpoint(path)
        (round_number,) = {float(v.flatten()[0]) for v in state.values()}  # one save's tensors, not two mixed
        assert all(bool((v == round_number).all()) for v in state.values())
    save_backbone(make_net(num_subnet=2), path)  # the next save sweeps what the killed ones left
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_backbone_on_a_full_disk_keeps_the_previous_file(suffix, source, tmp_path):
    path = save_backbone(source, tmp_path / f"backbone{suffix}")
    before = path.read_bytes()
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import torch
        from revcol import CheckpointError
        from revcol.checkpoints.backbone import save_backbone
        from revcol_helpers import make_net, revcol_env

        model = make_net(num_subnet=2, dtype=torch.float32, seed=99)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_backbone(model, sys.argv[1])
        except CheckpointError as error:
            print("error:", error)
        """
    )
    env = revcol_env(tmp_path / "env")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]  # one line
    assert "could not write" in error and "is unchanged" in error
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "env") == [path.name]
