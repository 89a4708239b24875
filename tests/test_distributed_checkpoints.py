"""The checkpoint folders of ``revcol.distributed`` (``checkpoints``, ``_folder``): what loading one trusts, and what
a failed save or load leaves.

* Loading reads no pickle that can call code: a ``.metadata`` or an ``extra`` value that would is refused.
* A failed load (a damaged shard) is a one-line ``CheckpointError`` and leaves the model and optimizer as they were.
* A save that is killed, or runs out of file space, leaves a folder that loads as the old checkpoint or the new
  one, whole. The kills are real SIGKILLs of forked copies of one child process (so torch is imported once): one
  just before every file operation of a save (counted with an audit hook), and a few at random times.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.models import make_net
from helpers.processes import revcol_env

from revcol import CheckpointError
from revcol.distributed._folder import CHECKSUMS, SafeReader
from revcol.distributed.checkpoints import load_checkpoint, save_checkpoint

RANDOM_KILLS = 6
FILE_LIMIT = 64 * 1024  # bytes: smaller than the model's shard, so the shard's write fails midway
CHILD_TIMEOUT = 150  # seconds for the whole child, all its forks


class _Touch:
    """Unpickles as a call of ``Path.touch(marker)``: a payload that runs code, harmlessly and visibly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _model(seed: int = 0) -> torch.nn.Module:
    return make_net(dtype=torch.float32, seed=seed)


def _filled(model: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(value)
    return model


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an AdamW that made one step, so that the optimizer has state."""
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    sum(o.sum() for o in model(torch.randn(1, 3, 32, 32))).backward()
    optimizer.step()
    return model, optimizer


def _bits(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[bytes]:
    tensors = [*model.state_dict().values()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return [t.detach().contiguous().numpy().tobytes() for t in tensors]


def test_metadata_that_pickles_a_call_is_refused(tmp_path):
    folder, marker, control = tmp_path / "ck", tmp_path / "marker", tmp_path / "control"
    save_checkpoint(folder, _model(1), extra={"epoch": 1})
    with open(folder / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # our own file, so plain pickle is fine here
    metadata.planner_data["payload"] = _Touch(marker)
    with open(folder / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    target = _model(2)
    before = [t.clone() for t in target.state_dict().values()]
    refused = r"ck is not loaded: its \.metadata pickles pathlib(\._local)?\.Path\.touch"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(folder, target)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, target.state_dict().values(), strict=True))
    pickle.loads(pickle.dumps(_Touch(control)))  # the payload is live: plain pickle runs it
    assert control.exists()


def test_the_metadata_is_read_once_per_load(tmp_path, monkeypatch):
    """``load_checkpoint`` checks the metadata and hands the same reader to DCP, which asks for it again."""
    save_checkpoint(tmp_path / "ck", _model(1), extra={"epoch": 1})
    reads = []
    real = SafeReader._read_metadata
    monkeypatch.setattr(SafeReader, "_read_metadata", lambda self: reads.append(self) or real(self))
    assert load_checkpoint(tmp_path / "ck", _model(2)) == {"epoch": 1}
    assert len(reads) == 1


def test_metadata_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, _model(1))
    (tmp_path / "secret").write_bytes(b"x" * (1 << 20))
    with open(folder / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # our own file, so plain pickle is fine here
    for info in metadata.storage_data.values():
        info.relative_path = "../secret"
    with open(folder / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    with pytest.raises(CheckpointError, match=r"names the shard file '\.\./secret', which is not a file of this"):
        load_checkpoint(folder, _model(2))


def test_extra_value_that_pickles_a_call_is_refused(tmp_path):
    folder, marker = tmp_path / "ck", tmp_path / "marker"
    save_checkpoint(folder, _model(1), extra={"epoch": 1, "payload": _Touch(marker)})
    assert not marker.exists()  # pickling it calls nothing
    target = _model(2)
    before = [t.clone() for t in target.state_dict().values()]
    with pytest.raises(CheckpointError, match=r"ck is not loaded: extra\.payload pickles \S+, which a weights-only"):
        load_checkpoint(folder, target)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, target.state_dict().values(), strict=True))


def test_plain_extra_values_and_optimizer_settings_round_trip(tmp_path):
    extra = {
        "epoch": 3,
        "loss": 0.25,
        "name": "run-1",
        "best": True,
        "note": None,
        "history": [1, 2.5, "x", [3]],
        "config": {"lr": 4e-3, "schedule": {"kind": "cosine", "steps": [10, 20]}},
        "a.b": 7,  # a dot in a key
    }
    source, optimizer = _trained(1)
    save_checkpoint(tmp_path / "ck", source, optimizer, extra)
    target, target_optimizer = _trained(2)
    target_optimizer.param_groups[0]["lr"] = 0.5
    assert load_checkpoint(tmp_path / "ck", target, target_optimizer) == extra
    assert target_optimizer.param_groups[0]["lr"] == 1e-3
    assert _bits(target, target_optimizer) == _bits(source, optimizer)


def test_truncated_shard_is_a_one_line_error_and_loads_nothing(tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, *_trained(1), extra={"epoch": 1})
    (shard,) = folder.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 9 // 10])  # most tensors still readable
    (folder / CHECKSUMS).unlink()  # as an older revcol wrote it: DCP itself finds the damage, halfway through
    target, optimizer = _trained(2)
    before, error = _bits(target, optimizer), None
    try:
        load_checkpoint(folder, target, optimizer)
    except Exception as e:  # DCP's own CheckpointException is a BaseException, which this would not catch
        error = e
    assert isinstance(error, CheckpointError), repr(error)
    message = str(error)
    assert "\n" not in message and message.startswith(f"{folder} could not be read, nothing was loaded ("), message
    assert _bits(target, optimizer) == before


@pytest.mark.parametrize("damage", ["bit rot", "truncated", "missing"])
def test_a_damaged_shard_is_found_by_its_checksum_before_anything_is_read(damage, tmp_path):
    folder = tmp_path / "ck"
    save_checkpoint(folder, *_trained(1))
    (shard,) = folder.glob("*.distcp")
    data = bytearray(shard.read_bytes())
    if damage == "bit rot":  # the same length, 64 bytes changed: DCP alone would load other numbers
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0x5A for b in data[len(data) // 2 : len(data) // 2 + 64])
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:-1]))
    else:
        shard.unlink()
    target, optimizer = _trained(2)
    before = _bits(target, optimizer)
    expected = "is missing" if damage == "missing" else "does not match the CRC-32 recorded when it was saved"
    with pytest.raises(CheckpointError, match=f"{folder} is damaged: {shard.name} {expected}".replace(".", r"\.")):
        load_checkpoint(folder, target, optimizer)
    assert _bits(target, optimizer) == before


def test_legacy_flat_folder_loads_and_is_replaced(tmp_path):
    """A folder written straight into ``path`` (revcol's first save_checkpoint) loads, and a save replaces it."""
    folder = tmp_path / "ck"
    old = _filled(_model(), 1.0)
    dcp.save({"model": old.state_dict(), "extra": {"epoch": 1}}, checkpoint_id=folder)
    assert load_checkpoint(folder, _model(2)) == {"epoch": 1}
    save_checkpoint(folder, _filled(_model(), 2.0), extra={"epoch": 2})
    target = _model(3)
    assert load_checkpoint(folder, target) == {"epoch": 2}
    assert all(torch.all(t == 2.0) for t in target.state_dict().values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_does_not_replace_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="holds files of something other than a checkpoint"):
        save_checkpoint(tmp_path, _model())
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_load_and_save_use_the_complete_copy_an_interrupted_swap_left(tmp_path):
    folder = tmp_path / "ck"
    for version in (1.0, 2.0):
        save_checkpoint(tmp_path / f"v{version:.0f}", _filled(_model(), version), extra={"version": version})
    # killed between moving the old folder aside and moving the new one in
    (tmp_path / "v1").rename(tmp_path / ".ck.previous")
    (tmp_path / "v2").rename(tmp_path / ".ck.incoming")
    assert load_checkpoint(folder, _model(3)) == {"version": 2.0}
    # the new one never completed: the old one is what loads
    (tmp_path / ".ck.incoming" / ".metadata").unlink()
    assert load_checkpoint(folder, _model(3)) == {"version": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.incoming", ".ck.previous"]  # loading renames nothing
    save_checkpoint(folder, _filled(_model(), 3.0), extra={"version": 3.0})
    assert load_checkpoint(folder, _model(3)) == {"version": 3.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---- the child process of the kill and full-disk tests ----


def _save_in_fork(folder: Path, version: float, kill_at: int = 0, file_limit: int = 0) -> int:
    """Fork; the fork saves ``version`` and exits with the number of file operations it made, or is SIGKILLed just
    before operation ``kill_at``, or writes files of at most ``file_limit`` bytes. Returns the fork's pid."""
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        return pid
    operations = 0

    def count(event: str, _args: tuple) -> None:
        nonlocal operations
        if event == "open" or event.startswith(("os.", "shutil.")):
            operations += 1
            if operations == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    code = 255
    try:
        sys.addaudithook(count)  # in the fork only: an audit hook cannot be removed
        if file_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        save_checkpoint(folder, _filled(_model(), version), extra={"version": version})
        code = min(operations, 250)
    except CheckpointError as e:
        code = 251 if "\n" not in str(e) and "was not written, the folder is as it was" in str(e) else 252
    finally:
        os._exit(code)


def _loads(folder: Path) -> float | str:
    """The version the folder loads as, checked to be whole (every tensor holds it), else what went wrong."""
    model = _model(7)
    try:
        version = load_checkpoint(folder, model)["version"]
    except (Exception, dcp.CheckpointException) as e:  # reported, so that every trial is seen
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if not all(torch.all(t == version) for t in model.state_dict().values()):
        return f"tensors of another version than {version}"
    return version


def crash_child(folder: str, seed: int) -> None:
    """Saves over a checkpoint, killed before each file operation in turn and at random times, then one that runs
    out of file space; after each, a plain save over what it left. Prints one JSON line of what each left."""
    torch.set_num_threads(1)
    rng, folder = random.Random(seed), Path(folder)
    save_checkpoint(folder, _filled(_model(), 0.0), extra={"version": 0.0})
    _, status = os.waitpid(_save_in_fork(folder, 1.0), 0)
    operations = os.waitstatus_to_exitcode(status)
    start = time.monotonic()
    save_checkpoint(folder, _filled(_model(), 1.0), extra={"version": 1.0})
    duration = time.monotonic() - start  # of one save, the span the random kills fall in
    plans = [("operation", k) for k in range(1, operations + 1)]
    plans += [("time", rng.uniform(0, duration)) for _ in range(RANDOM_KILLS)]
    plans += [("file size", FILE_LIMIT)]
    trials, old = [], 1.0
    for kind, point in plans:
        new = old + 1
        if kind == "time":
            pid = _save_in_fork(folder, new)
            time.sleep(point)
            os.kill(pid, signal.SIGKILL)
        else:
            pid = _save_in_fork(folder, new, **{"kill_at" if kind == "operation" else "file_limit": point})
        _, status = os.waitpid(pid, 0)
        trial = {"kill": [kind, point], "exit": os.waitstatus_to_exitcode(status), "old": old, "new": new}
        trial["loads"] = _loads(folder)
        # the next save starts from whatever this one left
        save_checkpoint(folder, _filled(_model(), new + 1), extra={"version": new + 1})
        trial["next save loads"] = _loads(folder)
        trial["left"] = sorted(p.name for p in folder.parent.iterdir())
        trials.append(trial)
        old = new + 1
    print(json.dumps({"operations": operations, "trials": trials}), flush=True)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory) -> dict:
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    workdir = tmp_path_factory.mktemp("crashes")
    seed = random.randrange(2**32)
    env = revcol_env(workdir, tests_on_path=True) | {"OMP_NUM_THREADS": "1"}
    code = f"import test_distributed_checkpoints as t; t.crash_child({str(workdir / 'checkpoints' / 'ck')!r}, {seed})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )
    assert done.returncode == 0, f"seed {seed}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"seed": seed}


def _check_trial(trial: dict, seed: int) -> None:
    assert trial["loads"] in (trial["old"], trial["new"]), f"seed {seed}: {trial}"
    assert trial["next save loads"] == trial["new"] + 1 and trial["left"] == ["ck"], f"seed {seed}: {trial}"


def test_a_killed_save_leaves_the_old_or_the_new_checkpoint(crashes):
    killed = [t for t in crashes["trials"] if t["kill"][0] in ("operation", "time")]
    for trial in killed:
        _check_trial(trial, crashes["seed"])
    assert crashes["operations"] >= 8, crashes  # the save's file operations were seen: writes, renames, removals
    by_operation = [t for t in killed if t["kill"][0] == "operation"]
    assert all(t["exit"] == -signal.SIGKILL for t in by_operation), by_operation
    # killed first thing the folder stays old, killed last it is new
    assert by_operation[0]["loads"] == by_operation[0]["old"] and by_operation[-1]["loads"] == by_operation[-1]["new"]


def test_a_save_that_runs_out_of_space_leaves_the_old_checkpoint(crashes):
    (full,) = [t for t in crashes["trials"] if t["kill"][0] == "file size"]
    assert full["loads"] == full["old"], full
    _check_trial(full, crashes["seed"])
    assert full["exit"] == 251, full  # the save raised a one-line CheckpointError
