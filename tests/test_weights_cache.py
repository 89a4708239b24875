"""The download cache (``revcol.weights.cache``): torch's hub folder, the URLs tried, and downloads that leave
nothing partial behind: broken servers and files, kills mid-download, concurrent downloads, the cache's permissions
and what may sit in it (``docs/reliability.md``). Deadlines, size bounds, credentials: ``test_weights_http.py``.

Every server is a local one on 127.0.0.1 (``helpers.server.WeightsServer``), name look-ups of any other host fail,
and every wait is bounded.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers.models import make_net
from helpers.processes import needs_another_user, revcol_env, run_as_nobody
from helpers.server import TEST_ENTRY, WeightsServer, closed_port, offline_weights, published_checkpoint

from revcol import CheckpointError, _atomic
from revcol.checkpoints.files import read_checkpoint
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published
from revcol.weights.cache import cache_path, download, is_cached
from revcol.weights.published import WEIGHTS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ENTRY = TEST_ENTRY
SERVED = f"/weights/{ENTRY.filename}"
RELEASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"
MIRROR = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/classification/"
MIRROR_ONLY = {"revcol_huge_megdata.pth", "revcol_huge_megdata_in1k.pth"}  # not in the GitHub release
CHILD = f"""
from revcol.weights.published import PublishedWeights
from revcol.weights.cache import download
print(download(PublishedWeights(**{asdict(ENTRY)!r}), progress=False))
"""


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> str:
    """Every test: torch's cache in tmp_path, weights from a closed local port, no other host reachable."""
    return offline_weights(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file in the authors' layout (with heads) and its backbone tensors."""
    return published_checkpoint()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _parts(folder: Path) -> list[Path]:
    return list(folder.glob(".*.part")) if folder.exists() else []


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _child(tmp_path: Path, server: WeightsServer) -> subprocess.Popen:
    env = revcol_env(tmp_path) | {"TORCH_HOME": str(tmp_path / "torch"), "REVCOL_WEIGHTS_URL": server.base}
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- where files go, which URLs are tried


def test_cache_path_follows_torch_home(cache):
    entry = WEIGHTS["revcol_tiny"]["in1k"]
    assert cache_path(entry) == cache / "revcol_tiny_1k.pth"
    assert not is_cached(entry)
    cache_path(entry).parent.mkdir(parents=True)
    cache_path(entry).write_bytes(b"placed by hand")
    assert is_cached(entry)


def test_urls_release_then_mirror_unless_overridden(monkeypatch):
    entry = WEIGHTS["revcol_base"]["in22k_ft_in1k_384"]
    assert entry.url == RELEASE + "revcol_base_22k_1kft_384.pth"
    assert entry.mirror_url == MIRROR + "revcol_base_22k_1kft_384.pth"
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", "http://127.0.0.1:1/some/mirror/")
    assert weights_cache.candidate_urls(entry) == ["http://127.0.0.1:1/some/mirror/revcol_base_22k_1kft_384.pth"]
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    assert weights_cache.candidate_urls(entry) == [entry.url, entry.mirror_url]


def test_each_entry_has_its_source_release_then_mirror_or_mirror_only(monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    # the downstream files (mirror-only too, in other folders): test_published_downstream.py
    for entry in (e for tags in WEIGHTS.values() for e in tags.values() if not e.is_downstream):
        mirror = MIRROR + entry.filename
        if entry.filename in MIRROR_ONLY:
            assert not entry.in_release and weights_cache.candidate_urls(entry) == [mirror] == [entry.url]
        else:
            assert entry.in_release and weights_cache.candidate_urls(entry) == [RELEASE + entry.filename, mirror]


def test_release_missing_falls_back_to_the_mirror(server, body, monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", f"http://127.0.0.1:{closed_port()}/release/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/")
    server.files[SERVED] = (body, "ok")
    assert download(ENTRY, progress=False).read_bytes() == body


# --------------------------------------------------------------------------- downloads


def test_download_lands_in_the_hub_cache_under_the_authors_name(serve, checkpoint, cache, capsys):
    server = serve(data=checkpoint[0])
    path = download(ENTRY)
    assert path == cache_path(ENTRY) and path.name == "revcol_test_1k.pth"
    assert path.read_bytes() == checkpoint[0]
    state = read_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in checkpoint[1].items())
    assert _files(cache) == [ENTRY.filename]
    assert server.requests == {SERVED: 1}
    err = capsys.readouterr().err
    assert "Downloading" in err  # progress=True reports like torch.hub
    assert re.search(r"100%\|.*\| \d+(\.\d+)?k/\d+(\.\d+)?k", err), err  # and draws tqdm's bar to the end


def test_cached_file_is_reused_without_a_request(serve, monkeypatch):
    server = serve()
    first = download(ENTRY, progress=False)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}")  # would fail if it were asked
    assert download(ENTRY, progress=False) == first
    assert server.requests == {SERVED: 1}


def test_a_copy_placed_by_hand_is_used(body):
    cache_path(ENTRY).parent.mkdir(parents=True)
    cache_path(ENTRY).write_bytes(body)
    assert download(ENTRY) == cache_path(ENTRY)  # the default URL is a closed port: no request made


def _failed_download(url_base: str) -> str:
    with pytest.raises(CheckpointError) as info:
        download(ENTRY, progress=False)
    message = str(info.value)
    assert ENTRY.filename in message
    assert f"{url_base}/{ENTRY.filename}" in message
    assert str(cache_path(ENTRY)) in message  # where a copy downloaded by hand goes
    assert ".part" not in message
    assert _files(cache_path(ENTRY).parent) == []  # nothing under the final name, no partial file
    return message


@pytest.mark.parametrize(
    ("served", "mode", "reason"),
    [
        (None, "ok", r"HTTP 404"),
        ("checkpoint", "truncate", r"truncated: got \d+ of \d+ bytes"),
        (b"<html><body>Not here</body></html>\n", "ok", "revcol_test_1k.pth is not a PyTorch checkpoint"),
        ("half", "ok", "revcol_test_1k.pth is not a readable PyTorch checkpoint"),
        ("no_backbone", "ok", "revcol_test_1k.pth holds no RevCol backbone tensors"),
    ],
    ids=["404", "truncated_body", "html_page", "corrupt_file", "not_revcol"],
)
def test_broken_download_leaves_nothing(served, mode, reason, server, body, monkeypatch):
    data = body
    if served == "no_backbone":
        buffer = io.BytesIO()
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, buffer)
        data = buffer.getvalue()
    served = {"checkpoint": data, "half": data[: len(data) // 2], "no_backbone": data}.get(served, served)
    if served is not None:
        server.files[SERVED] = (served, mode)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base + "/")  # a trailing slash is fine
    message = _failed_download(server.base)
    assert re.search(reason, message), message
    if mode == "truncate":
        assert f"got {len(data) // 2} of {len(data)} bytes" in message


def test_server_not_running(offline):
    assert "Connection refused" in _failed_download(offline)


def test_every_url_tried_is_reported(server, monkeypatch):
    monkeypatch.delenv("REVCOL_WEIGHTS_URL")
    release = f"http://127.0.0.1:{closed_port()}/release"
    monkeypatch.setattr(weights_published, "PRIMARY_BASE", release + "/")
    monkeypatch.setattr(weights_published, "MIRROR_BASE", server.base + "/")
    lines = _failed_download(release).splitlines()
    assert lines[1] == f"  {release}/{ENTRY.filename}: Connection refused"
    assert lines[2] == f"  {server.base}/{ENTRY.filename}: HTTP 404 Not Found"


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "not_a_folder"))
    with pytest.raises(CheckpointError, match=r"cannot write to the weights cache .*set TORCH_HOME"):
        download(ENTRY)


def test_a_cache_folder_that_takes_no_new_file_is_a_clear_error(serve, cache, monkeypatch):
    def refused(path: Path):
        raise PermissionError(13, "Permission denied", str(path))  # as a read-only folder answers (not to root)

    server = serve()
    monkeypatch.setattr(_atomic, "_claim", refused)
    with pytest.raises(CheckpointError, match=rf"cannot write to the weights cache {cache} \(Permission denied\)"):
        download(ENTRY, progress=False)
    assert _files(cache) == [] and server.requests == {}  # refused before asking anyone


# --------------------------------------------------------------------------- killed and concurrent downloads


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
    assert _files(cache) == [ENTRY.filename]  # the stale file is gone, and its lock file


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


def test_two_processes_downloading_at_once_end_with_one_good_file(serve, body, cache, tmp_path):
    server = serve("slow")
    server.gate = threading.Barrier(2, timeout=30)  # neither body starts before both requests are in
    children = [_child(tmp_path, server) for _ in range(2)]
    # the last line: Ultralytics may print a note when it first creates its settings file
    outputs = [child.communicate(timeout=90)[0].splitlines()[-1] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs == [str(cache_path(ENTRY))] * 2
    assert server.peak == 2 and server.requests == {SERVED: 2}  # they really overlapped
    assert cache_path(ENTRY).read_bytes() == body
    assert _files(cache) == [ENTRY.filename]  # no temporary file left behind, no lock file
    log = tmp_path / "network.log"  # the children, importing revcol and downloading, reached only 127.0.0.1
    assert all("127.0.0.1" in line for line in log.read_text().splitlines())


# --------------------------------------------------------------------------- permissions, and what is in the way


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


@pytest.fixture
def shared_folder():
    """A folder every user can enter (pytest's own temporary folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="revcol-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_an_unreadable_cached_file_is_a_checkpoint_error_naming_it(shared_folder, body):
    needs_another_user()
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
    run = run_as_nobody(code, shared_folder)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"CheckpointError: cannot read {path}: Permission denied"


def test_a_cache_filled_by_root_is_readable_by_other_users(shared_folder, serve, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to fill the cache as root")
    needs_another_user()
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
    run = run_as_nobody(code, shared_folder)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip().splitlines()[-1]) == len(make_net().state_dict())


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
