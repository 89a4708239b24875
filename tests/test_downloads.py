"""Downloads that nothing can strand or stall: kills mid-download, the cache's permissions and what may sit in it,
deadlines and size bounds, and ``pretrained=`` naming something that is not a file (``docs/reliability.md``).

Every server is a local one on 127.0.0.1 (``revcol_helpers.WeightsServer``); every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from revcol_helpers import TINY_CHANNELS, TINY_YOLO_YAML, WeightsServer, make_net, revcol_env

import revcol
from revcol import CheckpointError, VariantSpec, load_pretrained
from revcol.checkpoints.files import read_checkpoint
from revcol.core.network import parameter_count
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published
from revcol.weights.cache import cache_path, download
from revcol.weights.published import DEFAULT_TAGS, WEIGHTS, PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ENTRY = PublishedWeights("revcol_test", "in1k", "revcol_test_1k.pth", 224, 80.0, 1000)
SERVED = f"/weights/{ENTRY.filename}"
CHILD = f"""
from revcol.weights.published import PublishedWeights
from revcol.weights.cache import download
print(download(PublishedWeights(**{asdict(ENTRY)!r}), progress=False))
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """torch's cache in tmp_path, weights from a closed local port (a test that serves files points elsewhere)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("REVCOL_WEIGHTS_URL", f"http://127.0.0.1:{sock.getsockname()[1]}/weights")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def body() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": make_net(num_subnet=2, dtype=torch.float32, seed=3).state_dict()}, buffer)
    return buffer.getvalue()


@pytest.fixture
def serve(server, body, monkeypatch):
    """``serve(mode)``: the test checkpoint served in that mode, REVCOL_WEIGHTS_URL pointing at it."""
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base)

    def start(mode: str = "ok", data: bytes | None = None) -> WeightsServer:
        server.files[SERVED] = (body if data is None else data, mode)
        return server

    return start


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.glob(".*.part")] if folder.exists() else []


def _child(tmp_path: Path, server: WeightsServer) -> subprocess.Popen:
    env = revcol_env(tmp_path) | {"TORCH_HOME": str(tmp_path / "torch"), "REVCOL_WEIGHTS_URL": server.base}
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)


def test_credentials_in_the_weights_url_are_sent_as_basic_auth_and_never_printed(serve, cache, monkeypatch, capsys):
    server = serve()
    base = server.base.replace("http://", "http://mirror-user:s3cr%40t@")
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", base)
    assert download(ENTRY, progress=True) == cache / ENTRY.filename
    assert server.authorizations == ["Basic " + base64.b64encode(b"mirror-user:s3cr@t").decode()]
    missing = PublishedWeights("revcol_test", "in22k", "missing.pth", 224, None, None)
    with pytest.raises(CheckpointError) as info:
        download(missing, progress=True)
    printed = capsys.readouterr()
    assert "HTTP 404" in str(info.value)
    for text in (str(info.value), printed.out, printed.err):
        assert "s3cr" not in text and "mirror-user" not in text


# --------------------------------------------------------------------------- killed downloads (#19.1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_download_leaves_a_part_file_that_the_next_download_removes(sig, serve, body, cache, tmp_path):
    server = serve("slow")
    server.delay = 0.5  # 10 chunks: 5 s, time enough to kill it in the middle
    child = _child(tmp_path, server)
    try:
        _wait_for(lambda: any(p.stat().st_size > 0 for p in _parts(cache)))
        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -sig
    (stranded,) = _parts(cache)  # what the kill left: no handler of ours ran
    assert 0 < stranded.stat().st_size < len(body) and not cache_path(ENTRY).exists()
    server.files[SERVED] = (body, "ok")
    assert download(ENTRY, progress=False).read_bytes() == body
    assert _files(cache) == [ENTRY.filename]  # the stale file is gone


def test_a_live_download_is_never_swept(serve, body, cache, tmp_path):
    server = serve("slow")
    server.delay = 0.3
    child = _child(tmp_path, server)
    try:
        _wait_for(lambda: any(p.stat().st_size > 0 for p in _parts(cache)))
        (live,) = _parts(cache)
        assert weights_cache.sweep_partial_files(cache, [ENTRY.filename]) == []  # what the next download would do
        assert live.exists()
        output = child.communicate(timeout=60)[0]
    finally:
        child.kill()
    assert child.returncode == 0 and output.splitlines()[-1] == str(cache_path(ENTRY))
    assert cache_path(ENTRY).read_bytes() == body and _files(cache) == [ENTRY.filename]


def test_the_sweep_takes_only_unlocked_part_files_of_weights_files(cache):
    cache.mkdir(parents=True)
    abandoned = cache / f".{ENTRY.filename}.0123456789abcdef.part"
    published = cache / f".{WEIGHTS['revcol_tiny']['in1k'].filename}.fedcba9876543210.part"
    others = [cache / ".someone_else.pth.00.part", cache / "revcol_test_1k.pth.abc.partial", cache / "x.part"]
    for path in (abandoned, published, *others):
        path.write_bytes(b"partial")
    removed = weights_cache.sweep_partial_files(cache, [ENTRY.filename])
    assert sorted(removed) == sorted([abandoned, published])
    assert sorted(_files(cache)) == sorted(p.name for p in others)  # torch.hub's .partial and strangers stay


# --------------------------------------------------------------------------- permissions (#19.2)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_cached_file_gets_the_mode_of_an_ordinary_file(umask, serve, cache):
    serve()
    previous = os.umask(umask)
    try:
        path = download(ENTRY, progress=False)
        ordinary = cache / "made-by-open"
        ordinary.write_bytes(b"")  # as torch.hub's download creates its file
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == ordinary.stat().st_mode & 0o777


NOBODY = "nobody"


def _run_as_nobody(code: str, folder: Path) -> subprocess.CompletedProcess:
    """``code`` in a Python started by root that becomes ``nobody`` once it has read a checkpoint of its own: root
    reads any file whatever its mode, another user does not. That first read imports what ``torch.load`` imports
    lazily, so ``nobody`` needs no access to the interpreter's files (CI's venv sits in a folder only root enters).
    """
    account = pwd.getpwnam(NOBODY)
    home = folder / "home"
    home.mkdir()
    warm_up = home / "warm-up.pth"
    prologue = (
        "import os, torch\nfrom revcol.checkpoints import read_checkpoint\n"
        f"torch.save({{'w': torch.ones(1)}}, {str(warm_up)!r})\nread_checkpoint({str(warm_up)!r})\n"
        f"os.unlink({str(warm_up)!r})\nos.setgid({account.pw_gid})\nos.setuid({account.pw_uid})\n"
    )
    env = revcol_env(home) | {"HOME": str(home), "YOLO_CONFIG_DIR": str(home)}
    return subprocess.run(
        [sys.executable, "-c", prologue + code], env=env, cwd=home, capture_output=True, text=True, timeout=120
    )


def _needs_another_user() -> None:
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(NOBODY)
        except KeyError:
            pytest.skip("running as root without a 'nobody' user to read the file as")


@pytest.fixture
def shared_folder():
    """A folder every user can enter (pytest's own temporary folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="revcol-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_an_unreadable_cached_file_is_a_checkpoint_error_naming_it(shared_folder, body):
    _needs_another_user()
    path = shared_folder / "revcol_test_1k.pth"
    path.write_bytes(body)
    path.chmod(0o600)
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(CheckpointError, match=rf"cannot read {path}: Permission denied"):
            read_checkpoint(path)
        return
    code = (
        "from revcol import CheckpointError\nfrom revcol.checkpoints import read_checkpoint\n"
        f"try:\n    read_checkpoint({str(path)!r})\nexcept CheckpointError as e:\n    print('CheckpointError:', e)\n"
    )
    run = _run_as_nobody(code, shared_folder)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"CheckpointError: cannot read {path}: Permission denied"


def test_a_cache_filled_by_root_is_readable_by_other_users(shared_folder, serve, body, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to fill the cache as root")
    _needs_another_user()
    serve()
    monkeypatch.setenv("TORCH_HOME", str(shared_folder / "torch"))
    previous = os.umask(0o022)  # an image build's usual umask
    try:
        path = download(ENTRY, progress=False)
    finally:
        os.umask(previous)
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        folder.chmod(0o755)
    code = f"from revcol.checkpoints import read_checkpoint\nprint(len(read_checkpoint({str(path)!r})))"
    run = _run_as_nobody(code, shared_folder)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip().splitlines()[-1]) == len(make_net(num_subnet=2).state_dict())


# --------------------------------------------------------------------------- something in the way (#19.3)


@pytest.mark.parametrize(("make", "kind"), [(os.mkdir, "a directory"), (os.mkfifo, "a FIFO")])
def test_something_other_than_a_file_at_the_cache_path_fails_before_downloading(make, kind, serve, cache):
    server = serve()
    cache.mkdir(parents=True)
    make(cache_path(ENTRY))
    with pytest.raises(CheckpointError) as info:
        download(ENTRY, progress=False)
    assert f"the weights cache has {kind}" in str(info.value) and str(cache_path(ENTRY)) in str(info.value)
    assert "remove it" in str(info.value)
    assert server.requests == {}  # nothing was downloaded to be thrown away
    assert _files(cache) == [ENTRY.filename]


# --------------------------------------------------------------------------- deadlines and size bounds (#19.8)


def _fails_within(seconds: float, pattern: str) -> str:
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=pattern) as info:
        download(ENTRY, progress=False)
    assert time.monotonic() - start < seconds
    return str(info.value)


def test_a_trickling_body_is_cut_at_the_deadline(serve, cache, monkeypatch):
    server = serve("trickle")
    server.delay = 0.1  # ten bytes a second: every read brings something, none times out
    monkeypatch.setattr(weights_cache, "MIN_BYTES_PER_WINDOW", 0)  # the deadline alone
    monkeypatch.setattr(weights_cache, "DEADLINE_BASE_S", 1.0)
    monkeypatch.setattr(weights_cache, "MIN_RATE", 10**12)
    message = _fails_within(3.0, r"not finished within its deadline of [0-9.]+ s \(got \d+ of \d+ bytes\)")
    assert 0 < server.sent["trickle"] < 40, message
    assert _files(cache) == []


def test_a_trickle_fails_once_a_read_window_brings_too_little(serve, cache, monkeypatch):
    server = serve("trickle")
    server.delay = 0.05
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 0.5)
    _fails_within(3.0, r"too slow: \d+ bytes in [0-9.]+ s \(at least 65536 every 0.5 s are needed\)")
    assert _files(cache) == []


def test_the_deadline_interrupts_a_read_that_would_wait_longer(serve, cache, monkeypatch):
    serve("stall")  # headers never come; the per-read timeout (5 s here) would end it much later
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(weights_cache, "DEADLINE_BASE_S", 0.5)
    monkeypatch.setattr(weights_cache, "MIN_RATE", 10**12)
    _fails_within(2.5, r"not finished within its deadline of [0-9.]+ s \(got 0 bytes\)")
    assert _files(cache) == []


def test_an_endless_body_is_cut_at_the_size_bound(serve, cache, monkeypatch):
    server = serve("endless")
    monkeypatch.setattr(weights_published, "MAX_DOWNLOAD_BYTES", 1 << 20)  # ENTRY publishes no parameter count
    _fails_within(10.0, r"the body is longer than the 1048576 bytes this file can be; stopped there")
    assert server.sent["endless"] < 64 << 20  # the socket's buffers, not the whole disk
    assert _files(cache) == []


def test_an_announced_size_beyond_the_bound_is_refused_before_any_byte(serve, cache):
    serve("oversize")
    message = _fails_within(10.0, r"the server announces 10000000000000 bytes, more than the \d+ this file can be")
    assert str(ENTRY.max_bytes) in message and _files(cache) == []


def test_size_bounds_follow_the_published_parameter_counts():
    for entry in (e for tags in WEIGHTS.values() for e in tags.values()):
        spec = revcol.VARIANTS[entry.variant]
        config = (spec.channels, spec.layers, spec.num_subnet, entry.kernel_size, spec.level0_from_coarsest)
        backbone = parameter_count(*config)
        assert entry.max_bytes == int(entry.params_m * 1e6) * 24 + weights_published.SIZE_SLACK, entry
        # room at least for the backbone in float32 with the two Adam moments of an optimizer state saved with it
        assert entry.max_bytes > 12 * backbone + weights_published.SIZE_SLACK, entry
    assert WEIGHTS["revcol_tiny"]["in1k"].max_bytes > 114 << 20  # the real file (114 MB) fits
    assert ENTRY.max_bytes == weights_published.MAX_DOWNLOAD_BYTES  # no count published: the generous cap


# --------------------------------------------------------------------------- pretrained= naming no file (#19.8)


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "weights.pth"
    os.mkfifo(path)
    return path


def _in_thread(function, seconds: float = 10.0) -> BaseException | None:
    """Run ``function`` with a bound: a read of a FIFO or of /dev/zero would never return."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            function()
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize(("where", "kind"), [("fifo", "a FIFO \\(named pipe\\)"), ("/dev/zero", "a character device")])
def test_pretrained_naming_a_fifo_or_a_device_says_it_is_not_a_regular_file(where, kind, request):
    path = request.getfixturevalue("fifo") if where == "fifo" else Path(where)
    error = _in_thread(lambda: load_pretrained(make_net(), path))
    assert isinstance(error, CheckpointError)
    assert str(error) == f"{path} is {kind.replace(chr(92), '')}, not a regular file: a checkpoint is a file"


def test_a_yaml_row_naming_a_fifo_fails_clearly(fifo, monkeypatch):
    from ultralytics.nn.tasks import DetectionModel

    d = yaml.safe_load(TINY_YOLO_YAML)
    d["backbone"][0][3][0]["pretrained"] = str(fifo)
    error = _in_thread(lambda: DetectionModel(d, verbose=False))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)


# --------------------------------------------------------------------------- revcol info / download check (#19.4)


@pytest.fixture
def variant(monkeypatch) -> None:
    """``revcol_test``: a small variant whose one published file is ENTRY."""
    monkeypatch.setitem(revcol.VARIANTS, "revcol_test", VariantSpec(TINY_CHANNELS, (1, 1, 1, 1), 2, 0.1))
    monkeypatch.setitem(WEIGHTS, "revcol_test", {"in1k": ENTRY})
    monkeypatch.setitem(DEFAULT_TAGS, "revcol_test", "in1k")


def _info(capsys) -> tuple[int, str, str]:
    from revcol.cli import main

    status = main(["info", "revcol_test"])
    out, err = capsys.readouterr()
    (row,) = [line.split() for line in out.splitlines() if ENTRY.filename in line]
    return status, row[-1], err


def _other_variant(body: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(make_net(num_subnet=3).state_dict(), buffer)  # three columns, not two
    return buffer.getvalue()


DAMAGE = {
    "empty": (lambda body: b"", "is not a PyTorch checkpoint: .* an empty file"),
    "truncated": (
        lambda body: body[: len(body) // 2],
        "is not a readable PyTorch checkpoint \\(truncated or corrupt\\)",
    ),
    "other_variant": (_other_variant, "does not match this RevCol configuration"),
}


@pytest.mark.usefixtures("variant")
@pytest.mark.parametrize("damage", DAMAGE)
def test_info_and_download_check_what_they_report(damage, serve, body, cache, capsys):
    from revcol.cli import main

    make, reason = DAMAGE[damage]
    cache.mkdir(parents=True)
    cache_path(ENTRY).write_bytes(make(body))  # say, copied by hand and cut short
    status, cached, err = _info(capsys)
    assert (status, cached) == (1, "damaged")
    assert re.search(f"{cache_path(ENTRY)} {reason}" if damage != "other_variant" else reason, err), err
    assert "`revcol download revcol_test in1k` fetches it again" in err
    server = serve()
    assert main(["download", "revcol_test"]) == 0  # not "cached": fetched again, checked, then reported
    out, err = capsys.readouterr()
    assert out.strip() == str(cache_path(ENTRY)) and "downloading it again" in err
    assert cache_path(ENTRY).read_bytes() == body and server.requests == {SERVED: 1}
    assert _info(capsys)[:2] == (0, "yes")


@pytest.mark.usefixtures("variant")
def test_download_of_a_damaged_file_offline_fails_and_keeps_it(cache, capsys):
    from revcol.cli import main

    cache.mkdir(parents=True)
    cache_path(ENTRY).write_bytes(b"")
    assert main(["download", "revcol_test"]) == 1
    err = capsys.readouterr().err
    assert "downloading it again" in err and "could not download revcol_test_1k.pth" in err
    assert cache_path(ENTRY).read_bytes() == b""  # nothing better arrived, so nothing was replaced


@pytest.mark.usefixtures("variant")
def test_info_and_download_with_a_directory_at_the_cache_path(serve, cache, capsys):
    from revcol.cli import main

    server = serve()
    cache_path(ENTRY).mkdir(parents=True)
    status, cached, err = _info(capsys)
    assert (status, cached) == (1, "damaged") and f"{cache_path(ENTRY)} is a directory" in err
    assert main(["download", "revcol_test"]) == 1
    assert f"the weights cache has a directory at {cache_path(ENTRY)}" in capsys.readouterr().err
    assert server.requests == {}
