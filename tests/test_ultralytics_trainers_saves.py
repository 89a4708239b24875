"""Training checkpoints of a RevCol model survive a SIGKILL at any moment of a save (``revcol.ultralytics.trainers``:
``save_model`` writes through the hook table's ``save`` group, and the final ``strip_optimizer`` rewrite is atomic).

A subprocess trains a tiny model for a few epochs. Its file writer is slowed down at one chosen moment: inside the
chosen ``save_model`` call, the write of the chosen file (``last.pt``, ``best.pt`` or ``epoch1.pt``, or the temporary
file that stands for it) writes half of its bytes, makes them durable, tells the test, and waits; the test then
kills it with SIGKILL. Ultralytics writes ``last.pt`` in place, so without revcol's hook
that half is ``last.pt`` itself; with it the half is a temporary file and ``last.pt`` is the previous whole one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.processes import revcol_env
from helpers.yamls import TINY_YOLO_YAML

from revcol.demo import generate_dataset

IMGSZ = 64

TRAIN = textwrap.dedent(
    """
    import inspect, io, os, sys, time
    from pathlib import Path

    import torch

    import revcol  # noqa: F401
    from ultralytics import YOLO
    from ultralytics.engine.trainer import BaseTrainer

    model_yaml, data, project, signal_file, kill_save, kill_file, kill_strip = sys.argv[1:8]
    kill_save, kill_strip = int(kill_save), int(kill_strip)
    state = {"saves": 0, "inside": False}
    real_open, save_model = io.open, BaseTrainer.save_model

    class HalfThenWait:
        # the chosen write: half of the bytes on disk for sure, then wait for the kill
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            os.fsync(self.file.fileno())
            Path(signal_file).write_text(str(len(data)))
            time.sleep(120)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.__exit__(*exc)

    def slow_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        name = fd_names.get(file, "") if isinstance(file, int) else Path(os.fsdecode(file)).name
        if state["inside"] and "w" in mode and (name == kill_file or name.startswith(f".{kill_file}.")):
            return HalfThenWait(opened)
        return opened

    def counted_save(self, *args, **kwargs):
        state["saves"] += 1
        state["inside"] = state["saves"] == kill_save
        try:
            return save_model(self, *args, **kwargs)
        finally:
            state["inside"] = False

    real_os_open, fd_names = os.open, {}

    def named_os_open(path, flags, *args, **kwargs):
        # revcol's atomic writer opens its temporary file with os.open, then os.fdopen: remember the fd's file name
        fd = real_os_open(path, flags, *args, **kwargs)
        fd_names[fd] = Path(os.fsdecode(path)).name
        return fd

    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        # the final rewrite of last.pt (Ultralytics' strip_optimizer): half of its bytes to the file it names, then wait
        if not kill_strip or not any(frame.function == "strip_optimizer" for frame in inspect.stack()[1:4]):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        HalfThenWait(real_open(f, "wb")).write(buffer.getvalue())

    torch.save = slow_save
    io.open = slow_open  # pathlib's and os.fdopen's files both come from io.open
    os.open = named_os_open
    BaseTrainer.save_model = counted_save
    YOLO(model_yaml).train(
        data=data, epochs=4, imgsz=64, batch=4, workers=0, device="cpu", plots=False, amp=False, val=False,
        project=project, name="train", exist_ok=True, verbose=False, nbs=4, save_period=1,
    )
    """
)


def train_and_kill(tmp_path: Path, kill_save: int, kill_file: str, kill_strip: bool = False) -> Path:
    """Train in a subprocess, SIGKILL it inside the write of ``kill_file`` in save ``kill_save`` (or, with
    ``kill_strip``, inside the final rewrite of ``last.pt`` after the last epoch); returns the weights dir."""
    data = generate_dataset(tmp_path / "data", n_train=4, n_val=2, n_test=1, imgsz=IMGSZ, seed=0)
    (tmp_path / "model.yaml").write_text(TINY_YOLO_YAML)
    signal_file = tmp_path / "inside-the-save"
    args = [str(tmp_path / "model.yaml"), str(data), str(tmp_path / "runs"), str(signal_file), kill_save, kill_file]
    args.append(int(kill_strip))
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN, *map(str, args)],
        cwd=tmp_path, env=revcol_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not signal_file.exists():
            if process.poll() is not None:
                pytest.fail(f"training ended before the chosen save: {process.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the chosen save never came")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return tmp_path / "runs" / "train" / "weights"


def epoch_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize(
    ("kill_save", "kill_file", "last_epoch", "best_epoch", "epoch0_epoch"),
    [
        (1, "last.pt", None, None, None),  # the first save, writing last.pt: no checkpoint yet, no truncated one
        (2, "last.pt", 0, 0, 0),  # the second save, writing last.pt: the first save's last.pt, whole
        (2, "best.pt", 1, 0, 0),  # the second save, writing best.pt: the new last.pt, the previous best.pt
        (2, "epoch1.pt", 1, 1, 0),  # the second save, writing its save_period file (save_period=1): no epoch1.pt
    ],
)
def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_whole(
    tmp_path, kill_save, kill_file, last_epoch, best_epoch, epoch0_epoch
):
    weights = train_and_kill(tmp_path, kill_save, kill_file)
    assert not (weights / "epoch1.pt").exists()  # the killed save's: never a truncated one
    for name, epoch in (("last.pt", last_epoch), ("best.pt", best_epoch), ("epoch0.pt", epoch0_epoch)):
        if epoch is None:
            assert not (weights / name).exists(), name
        else:
            assert epoch_of(weights / name) == epoch, name  # loads: a whole checkpoint
    assert len(list(weights.glob(".*.part"))) == 1  # the half-written temporary file of the killed process


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_kill_inside_the_final_rewrite_leaves_the_last_epochs_checkpoint_whole(tmp_path):
    weights = train_and_kill(tmp_path, kill_save=0, kill_file="", kill_strip=True)
    assert epoch_of(weights / "last.pt") == 3  # the 4th epoch's save, whole, with its optimizer state
    assert epoch_of(weights / "best.pt") == 3  # not rewritten yet: the 4th save's, whole
    assert len(list(weights.glob(".last.pt.*.part"))) == 1  # the half-written rewrite


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_resume_after_a_kill_continues_and_clears_what_the_killed_save_left(tmp_path):
    weights = train_and_kill(tmp_path, kill_save=2, kill_file="last.pt")
    resume = textwrap.dedent(
        """
        import sys
        import revcol  # noqa: F401
        from ultralytics import YOLO
        YOLO(sys.argv[1]).train(resume=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", resume, str(weights / "last.pt")],
        cwd=tmp_path, env=revcol_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(weights.glob(".*.part")) == []  # its writer is dead: the next save removed it
    assert torch.load(weights / "last.pt", map_location="cpu", weights_only=False)["epoch"] == -1  # final, stripped
    printed = out.stdout + out.stderr
    assert "Resuming training" in printed
    # The final rewrite goes through a temporary file; the message names the checkpoint, not that file.
    assert f"Optimizer stripped from {weights / 'last.pt'}, " in printed and ".part" not in printed
