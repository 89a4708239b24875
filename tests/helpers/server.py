"""Weights from 127.0.0.1 only: a local HTTP server for a test's files (the ``server`` and ``serve`` fixtures of
conftest.py), a test's weights cache and URL made offline (``offline_weights``), a published file in the authors'
layout (``published_checkpoint``)."""

from __future__ import annotations

import io
import socket
import socketserver
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from helpers.models import TINY_CHANNELS, make_net
from helpers.processes import free_port
from revcol.weights.published import PublishedWeights


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files[path] = (body, mode)``; modes: ok, truncate, slow, stall, redirect (to the URL that
    ``body`` holds), and the hostile ones: trickle (one byte every ``server.delay`` s), endless (zeros without
    Content-Length until the client leaves), oversize (announces 10 TB, sends the body)."""

    server: WeightsServer
    timeout = 10  # seconds, on every request socket: a confused client cannot hold a thread forever

    def do_GET(self) -> None:
        self.server.arrived(self.path, self.headers.get("Authorization"))
        if self.path not in self.server.files:
            self.send_error(404)
            return
        body, mode = self.server.files[self.path]
        if mode == "stall":  # never answers (until the test ends)
            self.server.stop.wait(5)
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", body.decode())
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if mode != "endless":
            self.send_header("Content-Length", str(10**13 if mode == "oversize" else len(body)))
        self.end_headers()
        if mode in ("trickle", "endless"):
            self.server.send_forever(self.wfile, body, mode)
        elif mode == "truncate":  # promise the whole body, send half of it, close
            self.wfile.write(body[: len(body) // 2])
        elif mode == "slow":
            self.server.send_slowly(self.wfile, body)
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


class WeightsServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that counts the requests per path and how many were served at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: Counter[str] = Counter()
        self.authorizations: list[str | None] = []  # the Authorization header of each request, in order
        self.peak = 0  # most requests in flight at the same time
        self.gate: threading.Barrier | None = None  # set: "slow" bodies wait until that many requests arrived
        self.delay = 0.05  # seconds between the chunks of a "slow" body and the bytes of a "trickle"
        self.sent: Counter[str] = Counter()  # bytes of "trickle" and "endless" bodies sent, per mode
        self.stop = threading.Event()
        self._active = 0
        self._lock = threading.Lock()

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's version does a reverse name look-up: not needed
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/weights"

    def arrived(self, path: str, authorization: str | None = None) -> None:
        with self._lock:
            self.requests[path] += 1
            self.authorizations.append(authorization)

    def send_slowly(self, out: io.BufferedIOBase, body: bytes, chunks: int = 10) -> None:
        with self._lock:
            self._active += 1
            self.peak = max(self.peak, self._active)
        try:
            if self.gate is not None:
                self.gate.wait()
            step = -(-len(body) // chunks)
            for start in range(0, len(body), step):
                out.write(body[start : start + step])
                out.flush()
                if self.stop.wait(self.delay):  # the test ended
                    return
        except OSError:  # the client hung up
            return
        finally:
            with self._lock:
                self._active -= 1

    def send_forever(self, out: io.BufferedIOBase, body: bytes, mode: str) -> None:
        """Until the client leaves or the test ends: the body a byte at a time (trickle) or zeros (endless)."""
        chunk = bytes(64 << 10)
        try:
            for index in range(len(body) if mode == "trickle" else 1 << 40):
                data = body[index : index + 1] if mode == "trickle" else chunk
                out.write(data)
                out.flush()
                with self._lock:
                    self.sent[mode] += len(data)
                if self.stop.wait(self.delay if mode == "trickle" else 0):
                    return
        except OSError:  # the client hung up
            return


# The published file of "revcol_test", a small variant that the tests needing one register (WEIGHTS, VARIANTS).
TEST_ENTRY = PublishedWeights("revcol_test", "in1k", "revcol_test_1k.pth", 224, 80.0, 1000)
LOCAL_HOSTS = ("127.0.0.1", "localhost")


closed_port = free_port  # a port nothing listens on: a connection to it is refused at once


def offline_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """torch's cache in ``tmp_path``, weights from a closed local port, name look-ups of any other host failing;
    returns that URL base (a test that serves files points REVCOL_WEIGHTS_URL elsewhere)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    closed = f"http://127.0.0.1:{closed_port()}/weights"
    monkeypatch.setenv("REVCOL_WEIGHTS_URL", closed)
    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            raise OSError(f"the test tried to reach {host!r}; only 127.0.0.1 is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    return closed


def published_checkpoint(seed: int = 5) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file in the authors' layout (``model``, with intermediate-supervision heads) and its backbone tensors."""
    backbone = make_net(dtype=torch.float32, seed=seed).state_dict()
    heads = {
        "cls_blocks.0.weight": torch.randn(10, TINY_CHANNELS[-1]),
        "cls_blocks.0.bias": torch.randn(10),
        "decoder_blocks.0.conv.weight": torch.randn(3, TINY_CHANNELS[0], 1, 1),
    }
    buffer = io.BytesIO()
    torch.save({"model": {**backbone, **heads}}, buffer)
    return buffer.getvalue(), backbone
