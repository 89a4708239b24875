"""What the ``revcol`` command prints for the errors a user makes (``revcol.cli.problems``): one message that names the
argument or file and what is wrong, a line pointing to the help, an exit status (2 for the command line itself, 1
for what it names), no traceback unless ``REVCOL_TRACEBACK=1``. The installed script once, for what only a separate
process shows (the exit status, no download attempt); ``main`` in-process for the rest."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.processes import revcol_env
from helpers.yamls import TINY_RTDETR_YAML

from revcol.cli import main
from revcol.cli.commands import HINTS
from revcol.errors import RevColError

REVCOL = Path(sys.executable).with_name("revcol")
CHECKPOINT = Path(__file__).parent / "fixtures" / "yolo-revcol-tiny-f4fd18d.pt"


def printed_error(capsys) -> list[str]:
    """The lines the command wrote to stderr, Ultralytics' colours taken out; nothing of a traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return re.sub(r"\x1b\[[0-9;]*m", "", err).strip().splitlines()


def test_a_command_without_model_names_model_and_a_shipped_config_and_fetches_nothing(tmp_path):
    run = subprocess.run(
        [str(REVCOL), "train", "data=data.yaml", "epochs=1"],
        cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    message, hint = run.stderr.strip().splitlines()[-2:]
    assert message.startswith("revcol train: no model= given") and "model=rtdetr-revcol-cpu.yaml data=" in message
    assert hint == HINTS[2] and "Traceback" not in run.stderr and "yolo26n" not in run.stdout + run.stderr
    assert not (tmp_path / "network.log").exists(), (tmp_path / "network.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ultralytics-config"]  # no runs/, no download


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["download"], "revcol download: the following arguments are required: variant"),
        (["info", "--imgsz", "33"], "revcol info: --imgsz must be a positive multiple of 32, got 33"),
        (["predict", "source=image.jpg"], "revcol predict: no model= given"),
        (
            ["train", "model=mine.yaml", "epochs=3"],
            "revcol train: no data= given: name a dataset YAML, e.g. "
            "`revcol train model=mine.yaml data=path/to/data.yaml`",
        ),
        (["train", "model=best.pt"], "revcol train: no data= given"),
        (["train", "model=rtdetr-revcol-cpu.yaml", "epochz=3"], "revcol train: 'epochz' is not a valid YOLO argument"),
    ],
)
def test_usage_errors_say_which_command_not_syntaxerror(args, start, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    lines = printed_error(capsys)
    message = next(line for line in lines if line.startswith("revcol "))
    assert message.startswith(start) and lines[-1] == HINTS[2]
    assert not any("SyntaxError" in line for line in lines)


def with_a_flipped_pickle_byte(checkpoint: Path) -> bytes:
    """The bytes of ``checkpoint`` with one byte of its pickle (stored uncompressed, as torch writes it) flipped."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith("/data.pkl"))
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0xFF
    return bytes(data)


def broken_files(folder: Path) -> dict[str, tuple[str, str]]:
    """``model=`` files a user may have, each with the start of what the command says about it."""
    (folder / "empty.pt").write_bytes(b"")
    (folder / "cut.pt").write_bytes(CHECKPOINT.read_bytes()[:3000])  # a copy that stopped short
    (folder / "damaged.pt").write_bytes(with_a_flipped_pickle_byte(CHECKPOINT))
    (folder / "data.yaml").write_text("path: shapes\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    (folder / "unclosed.yaml").write_text("backbone: [1\n")
    return {
        "empty.pt": ("CheckpointError", "empty.pt (0 bytes) is not a readable checkpoint: empty, truncated"),
        "cut.pt": ("CheckpointError", "cut.pt (3,000 bytes) is not a readable checkpoint: empty, truncated"),
        "damaged.pt": ("CheckpointError", "damaged.pt is damaged: its entry "),
        "data.yaml": ("ConfigError", "data.yaml is not a model YAML: no `backbone` and `head` lists, only path, "),
        "unclosed.yaml": ("ConfigError", "unclosed.yaml is not a readable YAML file at line 2"),
    }


def test_a_broken_model_file_is_one_message_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    for name, (kind, start) in broken_files(tmp_path).items():
        assert main(["val", f"model={name}", "data=data.yaml", "device=cpu"]) == 1, name
        lines = printed_error(capsys)
        message, hint = lines[-2:]
        assert message.startswith(f"{kind}: {start}"), (name, lines)
        assert hint == HINTS[1]
    assert not (tmp_path / "runs").exists()


def test_a_missing_dataset_is_one_message_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(TINY_RTDETR_YAML)
    for mode in ("train", "val"):
        args = [mode, "model=mine.yaml", "data=no-such-data.yaml", "imgsz=64", "device=cpu", f"project={tmp_path}"]
        assert main(args) == 1
        message, hint = printed_error(capsys)[-2:]
        assert message.startswith("FileNotFoundError: ") and "'no-such-data.yaml' does not exist" in message, mode
        assert hint == HINTS[1]


def test_revcol_traceback_shows_the_error_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.setenv("REVCOL_TRACEBACK", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SyntaxError, match="no model= given"):
        main(["val", "data=data.yaml"])
    with pytest.raises(Exception) as raised:  # Ultralytics' own error: its class depends on the release
        main(["val", "model=empty.pt", "data=data.yaml"])
    assert not isinstance(raised.value, (SyntaxError, RevColError))  # the error itself, not revcol's account of it
