"""One download's transfer (``revcol.weights._http``, through ``revcol.weights.download``): deadlines, the minimum
rate, size bounds, timeouts, credentials, redirects and ``file:`` mirrors (``docs/reliability.md``).

Every server is a local one on 127.0.0.1 (``helpers.server.WeightsServer``), name look-ups of any other host fail,
and every test that waits sets short bounds, so none waits long.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers.server import TEST_ENTRY, offline_weights

from revcol import CheckpointError
from revcol.weights import cache as weights_cache
from revcol.weights import published as weights_published
from revcol.weights._http import without_credentials
from revcol.weights.cache import cache_path, download
from revcol.weights.published import PublishedWeights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ENTRY = TEST_ENTRY
SERVED = f"/weights/{ENTRY.filename}"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> str:
    """Every test: torch's cache in tmp_path, weights from a closed local port, no other host reachable."""
    return offline_weights(tmp_path, monkeypatch)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _fails_within(seconds: float, pattern: str) -> str:
    """The message of the ``CheckpointError`` that ``download`` raises within ``seconds``; it names the URL and where
    a copy fetched by hand goes, and no temporary file."""
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=pattern) as info:
        download(ENTRY, progress=False)
    assert time.monotonic() - start < seconds
    message = str(info.value)
    assert f"/weights/{ENTRY.filename}" in message and str(cache_path(ENTRY)) in message
    assert ".part" not in message
    return message


# --------------------------------------------------------------------------- credentials


def test_without_credentials_splits_them_off_as_a_basic_header():
    assert without_credentials("https://mirror.example/w/a.pth") == ("https://mirror.example/w/a.pth", None)
    address, header = without_credentials("https://us%3Aer:p%40ss:word@mirror.example:8443/w/a.pth")
    assert address == "https://mirror.example:8443/w/a.pth"
    assert header == "Basic " + base64.b64encode(b"us:er:p@ss:word").decode()


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


def test_credentials_are_not_sent_where_a_redirect_leads_to_another_host(serve, body, monkeypatch):
    server = serve()
    server.files["/weights/moved/revcol_test_1k.pth"] = (
        f"http://localhost:{server.server_port}{SERVED}".encode(),
        "redirect",
    )
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", server.base.replace("http://", "http://mirror-user:pw@") + "/moved")
    assert download(ENTRY, progress=False).read_bytes() == body
    assert server.requests == {"/weights/moved/revcol_test_1k.pth": 1, SERVED: 1}
    assert server.authorizations == ["Basic " + base64.b64encode(b"mirror-user:pw").decode(), None]


def test_a_mirror_on_a_shared_disk_is_a_file_url(body, cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror folder"
    mirror.mkdir()
    (mirror / ENTRY.filename).write_bytes(body)
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", mirror.as_uri())
    assert download(ENTRY, progress=False).read_bytes() == body and _files(cache) == [ENTRY.filename]
    missing = PublishedWeights("revcol_test", "in22k", "missing.pth", 224, None, None)
    with pytest.raises(CheckpointError, match=r"mirror%20folder/missing.pth: No such file or directory"):
        download(missing, progress=False)
    os.mkfifo(mirror / "fifo.pth")  # refused, not read for ever
    fifo = PublishedWeights("revcol_test", "in22k", "fifo.pth", 224, None, None)
    with pytest.raises(CheckpointError, match=r"fifo.pth is not a regular file"):
        download(fifo, progress=False)
    monkeypatch.setattr(weights_published, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(CheckpointError, match=rf"the file has {len(body)} bytes, more than the 1000 this file can be"):
        download(ENTRY, progress=False, replace=True)
    assert _files(cache) == [ENTRY.filename] and cache_path(ENTRY).read_bytes() == body


# --------------------------------------------------------------------------- deadlines and size bounds


def test_a_stalled_server_times_out(serve, monkeypatch):
    server = serve("stall")
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 0.3)
    assert "no answer within 0.3 s" in _fails_within(3.0, rf"{server.base}/{ENTRY.filename}: ")
    assert _files(cache_path(ENTRY).parent) == []


def test_headers_trickled_forever_are_cut_at_the_deadline(cache, monkeypatch):
    """A server that sends its status line and headers a byte at a time, never ending them: no read times out, and the
    call still returns at the deadline (the request is given up, its thread left to the server's pace)."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    sent = []

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            # 200 bytes, 10 s: a client without the deadline fails the time bound instead of hanging the test
            for byte in itertools.islice(itertools.cycle(b"HTTP/1.1 200 OK\r\nX-Padding: "), 200):
                try:
                    connection.sendall(bytes([byte]))
                except OSError:  # the client gave up and closed its end
                    return
                sent.append(byte)
                if stop.wait(0.05):
                    return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", f"http://127.0.0.1:{listener.getsockname()[1]}/weights")
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 5.0)  # every byte comes well within it
    monkeypatch.setattr(weights_cache, "DEADLINE_BASE_S", 1.0)
    monkeypatch.setattr(weights_cache, "MIN_RATE", 10**12)
    try:
        _fails_within(3.0, r"not finished within its deadline of [0-9.]+ s \(got 0 bytes\)")
        assert len(sent) > 5  # the server was sending all along
        assert _files(cache) == []
    finally:
        stop.set()
        listener.close()
        thread.join(5)


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


def test_a_deadline_shorter_than_the_read_timeout_bounds_each_read(serve, cache, monkeypatch):
    serve("stall")  # headers never come; the read timeout (5 s here) would end it much later
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(weights_cache, "DEADLINE_BASE_S", 0.5)
    monkeypatch.setattr(weights_cache, "MIN_RATE", 10**12)
    _fails_within(2.5, r"not finished within its deadline of [0-9.]+ s \(got 0 bytes\)")
    assert _files(cache) == []


def test_a_body_that_stalls_ends_within_the_deadline_and_one_read_timeout(serve, body, cache, monkeypatch):
    server = serve("slow")
    server.delay = 5.0  # the first tenth of the body, then nothing for longer than the bound below
    monkeypatch.setattr(weights_cache, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(weights_cache, "DEADLINE_BASE_S", 0.5)  # shorter than TIMEOUT_S: each read waits <= 0.57 s
    monkeypatch.setattr(weights_cache, "MIN_RATE", 10**12)
    _fails_within(2.5, r"not finished within its deadline of 0.5 s \(got \d+ of \d+ bytes\)")
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
