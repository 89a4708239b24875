"""Reading checkpoint files (revcol.checkpoints.files, docs/reliability.md "Checkpoint files"): the formats, told by
content; files that are no checkpoint, unreadable, truncated, damaged, ambiguous; pickles that would run code.

Every case goes through ``load_pretrained`` or ``read_checkpoint``; the strict backbone checks are in
test_checkpoints_backbone.py, numpy metadata in test_checkpoints_numpy_meta.py.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers.checkpoints import assert_load_refused, assert_same_weights, clear_load_error
from helpers.models import make_net

from revcol import CheckpointError, load_pretrained
from revcol.checkpoints.backbone import read_backbone, save_backbone
from revcol.checkpoints.files import read_checkpoint, refused_globals

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- formats


def test_legacy_serialization_and_string_path(source, target, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": source.state_dict()}, path, _use_new_zipfile_serialization=False)
    load_pretrained(target, str(path))
    assert_same_weights(target, source)


def test_format_is_told_by_content_not_by_name(source, target, tmp_path):
    as_pth = tmp_path / "w.pth"
    safetensors.torch.save_file(source.state_dict(), as_pth)
    load_pretrained(target, as_pth)
    assert_same_weights(target, source)
    other = make_net(dtype=torch.float32, seed=13, randomize=False)
    as_safetensors = tmp_path / "t.safetensors"
    torch.save(source.state_dict(), as_safetensors)
    load_pretrained(other, as_safetensors)
    assert_same_weights(other, source)


@pytest.mark.parametrize(
    "content",
    [[torch.zeros(1)], {"model": [1, 2]}, {"stem.0.weight": torch.zeros(1), "epoch": 3}, {1: torch.zeros(1)}],
    ids=["list", "model_not_dict", "non_tensor_value", "non_string_key"],
)
def test_file_without_state_dict(content, target, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_pretrained(target, path)


# --------------------------------------------------------------------------- unreadable files


def test_missing_file(target, tmp_path):
    clear_load_error(target, tmp_path / "nope.pth", "not found")


def test_directory_is_not_a_checkpoint(target, tmp_path):
    clear_load_error(target, tmp_path, "is a directory")


def test_home_is_expanded(source, target, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    load_pretrained(target, "~/w.pth")
    assert_same_weights(target, source)


@pytest.mark.parametrize(
    "data", [b"", b"hello world\n", b"{'stem.0.weight': 1}", b"\x00" * 64, bytes(range(256))], ids=repr
)
def test_non_checkpoint_file(data, target, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(data)
    clear_load_error(target, path, "not a PyTorch checkpoint")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(fraction, legacy, source, target, tmp_path):
    full = tmp_path / "full.pth"
    torch.save(source.state_dict(), full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: max(4, int(len(data) * fraction))])
    clear_load_error(target, path, "truncated or corrupt|refused|not a PyTorch checkpoint")


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_safetensors_is_a_clear_error(fraction, source, target, tmp_path):
    full = tmp_path / "full.safetensors"
    safetensors.torch.save_file(source.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert_load_refused(target, cut, "not a readable safetensors file|not a PyTorch checkpoint")


def test_corrupt_header_is_a_clear_error(target, tmp_path):
    path = tmp_path / "w.safetensors"
    header = b'{"stem.0.weight": 12'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert_load_refused(target, path, "not a readable safetensors file")


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


# --------------------------------------------------------------------------- damage and ambiguity


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


# --------------------------------------------------------------------------- malicious pickles


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsBuiltin:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsBuiltin])
@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle", "inside_state_dict"])
def test_malicious_pickle_is_refused_and_not_executed(payload, writer, source, target, tmp_path):
    marker = tmp_path / "executed"
    evil = payload(marker)
    path = tmp_path / "evil.pth"
    if writer == "torch_save":
        torch.save(evil, path)
    elif writer == "raw_pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    else:
        torch.save({**source.state_dict(), "cls.weight": evil}, path)
    error = clear_load_error(target, path, "refused by weights-only loading")
    assert not marker.exists()
    assert "code that would run on load" in str(error)
    assert "In PyTorch 2.6" not in str(error)  # torch's generic advice is left out
    function = evil.__reduce__()[0]  # the global the refusal names, however the file was written
    assert f"unsupported GLOBAL {function.__module__}.{function.__name__}" in str(error)
    # the payload really is dangerous: an unrestricted unpickle would run it
    pickle.loads(pickle.dumps(evil))
    assert marker.exists()


def test_the_refused_globals_are_torchs_own_list_in_either_format(tmp_path):
    """What a refusal names comes from torch's listing of the pickle (never from its error text): the zip format,
    the legacy format's pickles one by one, a bare pickle; a damaged pickle names what came before the damage."""
    shell = f"{os.system.__module__}.system"
    evil = {"stem.0.bias": torch.ones(2), "x": _RunsShell(tmp_path / "never")}
    for legacy in (False, True):
        for content, expected in [(evil, [shell]), ({"stem.0.bias": torch.ones(2)}, [])]:
            buffer = io.BytesIO()
            torch.save(content, buffer, _use_new_zipfile_serialization=not legacy)
            assert refused_globals(buffer) == expected, (legacy, content)
    bare = pickle.dumps([_RunsShell(tmp_path / "never"), _RunsBuiltin(tmp_path / "never")], protocol=2)
    assert refused_globals(io.BytesIO(bare)) == ["builtins.exec", shell]
    assert refused_globals(io.BytesIO(bare[: len(bare) // 2])) == []  # cut before its end: nothing is listed
    assert refused_globals(io.BytesIO(b"PK\x03\x04 not a zip")) == []
    assert not (tmp_path / "never").exists()
