"""Shared test helpers: the tiny configuration, models and YAMLs, gradient comparison (the gradients themselves are
``revcol.diagnostics``', shared with examples/ and benchmarks/), a free local port, subprocess env, a local weights
server."""

from __future__ import annotations

import io
import os
import pwd
import socket
import socketserver
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from revcol import CheckpointError, FullNet, RevColClassifier, VariantSpec, load_pretrained
from revcol.diagnostics import gradients, randomize_, relative_error
from revcol.diagnostics import output_weights as output_weights
from revcol.weights.published import PublishedWeights

TINY_CHANNELS = (8, 16, 24, 32)
STRIDES = (4, 8, 16, 32)
# The tiny configuration of most tests, as FullNet's keyword arguments and as a variant (with drop-path).
TINY_CONFIG = {"channels": TINY_CHANNELS, "layers": (1, 1, 1, 1), "num_subnet": 2}
TINY_SPEC = VariantSpec(**TINY_CONFIG, drop_path=0.1)
# One train-mode forward and backward on either path: revcol.diagnostics' (examples and benchmarks use it too).
run_grads = gradients


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now: a server (a torchrun rendezvous) may bind it, and a client
    connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Detectors on a very small custom RevCol backbone (reversible, with drop-path), trained end to end at 64 px.
TINY_BACKBONE = "[-1, 1, revcol, [{channels: [8, 16, 32, 64], layers: [1, 1, 1, 1], num_subnet: 2, drop_path: 0.1}]]"
# 10 queries: RT-DETR needs at least as many anchors as queries, and at 64 px there are 8*8 + 4*4 + 2*2 = 84.
TINY_RTDETR_YAML = f"""\
nc: 3
backbone:
  - {TINY_BACKBONE}  # 0-4
head:
  - [-1, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 5
  - [-1, 1, AIFI, [64, 2]]  # 6
  - [-1, 1, Conv, [32, 1, 1]]  # 7
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 8
  - [3, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 9
  - [[-2, -1], 1, Concat, [1]]  # 10
  - [-1, 1, RepC3, [32, 0.5]]  # 11
  - [-1, 1, Conv, [32, 1, 1]]  # 12
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 13
  - [2, 1, Conv, [32, 1, 1, None, 1, 1, False]]  # 14
  - [[-2, -1], 1, Concat, [1]]  # 15
  - [-1, 1, RepC3, [32, 0.5]]  # 16
  - [-1, 1, Conv, [32, 3, 2]]  # 17
  - [[-1, 12], 1, Concat, [1]]  # 18
  - [-1, 1, RepC3, [32, 0.5]]  # 19
  - [-1, 1, Conv, [32, 3, 2]]  # 20
  - [[-1, 7], 1, Concat, [1]]  # 21
  - [-1, 1, RepC3, [32, 0.5]]  # 22
  - [[16, 19, 22], 1, RTDETRDecoder, [nc, 32, 10, 2, 2, 1, 64]]  # 23
"""
# The neck of the tiny YOLO models: P5 (layer 4) upsampled and merged with P4 (layer 3) and P3 (layer 2).
TINY_NECK = """\
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 5
  - [[-1, 3], 1, Concat, [1]]  # 6
  - [-1, 1, C2f, [32]]  # 7
  - [-1, 1, nn.Upsample, [None, 2, 'nearest']]  # 8
  - [[-1, 2], 1, Concat, [1]]  # 9
  - [-1, 1, C2f, [16]]  # 10 P3
"""


def tiny_yaml(head: str, *, backbone: str = TINY_BACKBONE, neck: str = TINY_NECK, nc: int = 3, extra: str = "") -> str:
    """A tiny YOLO-style model YAML: ``backbone`` (one row, layers 0-4), ``neck``, then the ``head`` row."""
    return f"nc: {nc}\n{extra}backbone:\n  - {backbone}  # 0-4\nhead:\n{neck}  - {head}\n"


TINY_YOLO_YAML = tiny_yaml("[[10, 7, 4], 1, Detect, [nc]]")


def make_net(
    channels: Sequence[int] = TINY_CHANNELS,
    layers: Sequence[int] = (1, 1, 1, 1),
    num_subnet: int = 2,
    *,
    drop_path: float = 0.0,
    save_memory: bool = True,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    randomize: bool = True,
) -> FullNet:
    torch.manual_seed(seed)
    model = FullNet(channels, layers, num_subnet, kernel_size=kernel_size, drop_path=drop_path, save_memory=save_memory)
    model = model.to(dtype)
    if randomize:
        randomize_(model, seed)
    return model.train()


def make_input(n: int = 2, h: int = 32, w: int = 32, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=generator, dtype=torch.float64).to(dtype)


def assert_close_per_tensor(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float, what: str = "gradient"
) -> float:
    """Same keys, all finite, and every tensor's relative error <= ``tol``; returns the worst error."""
    assert set(actual) == set(expected), f"{what} keys differ: {sorted(set(actual) ^ set(expected))}"
    worst, worst_name = 0.0, None
    for name, value in expected.items():
        assert torch.isfinite(actual[name]).all(), f"non-finite {what} for {name}"
        assert torch.isfinite(value).all(), f"non-finite reference {what} for {name}"
        assert actual[name].shape == value.shape, f"{what} shape of {name}: {actual[name].shape} != {value.shape}"
        error = relative_error(actual[name], value)
        if error > worst:
            worst, worst_name = error, name
    assert worst <= tol, f"{what} of {worst_name} differs: relative error {worst:.3e} > {tol:.1e}"
    return worst


def set_alphas(model: FullNet, value: float) -> None:
    """Every alpha of every column set to ``value``."""
    with torch.no_grad():
        for subnet in model.subnets:
            for alpha in subnet.alphas:
                alpha.fill_(value)


def count_nonzero_grads(grads: dict[str, torch.Tensor]) -> int:
    return sum(bool(g.abs().sum() > 0) for g in grads.values())


NETGUARD = Path(__file__).parent / "_netguard"


def revcol_env(workdir: Path) -> dict[str, str]:
    """Env for a ``revcol`` subprocess: offline, settings in workdir, network attempts logged, not seen as pytest."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # else Ultralytics redirects runs/
    (workdir / "ultralytics-config").mkdir(parents=True, exist_ok=True)  # else it falls back to a shared /tmp folder
    env.update(
        YOLO_OFFLINE="true",
        YOLO_CONFIG_DIR=str(workdir / "ultralytics-config"),
        REVCOL_NETWORK_LOG=str(workdir / "network.log"),
        TORCH_HOME=str(workdir / "torch"),  # an empty weights cache, not the machine's
        PYTHONPATH=os.pathsep.join(filter(None, [str(NETGUARD), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    return env


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
    backbone = make_net(num_subnet=2, dtype=torch.float32, seed=seed).state_dict()
    heads = {
        "cls_blocks.0.weight": torch.randn(10, 32),
        "cls_blocks.0.bias": torch.randn(10),
        "decoder_blocks.0.conv.weight": torch.randn(3, 8, 1, 1),
    }
    buffer = io.BytesIO()
    torch.save({"model": {**backbone, **heads}}, buffer)
    return buffer.getvalue(), backbone


NOBODY = "nobody"


def needs_another_user() -> None:
    """Skip the test when it runs as root and there is no ``nobody`` to read files as."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(NOBODY)
        except KeyError:
            pytest.skip("running as root without a 'nobody' user to read the file as")


def run_as_nobody(code: str, folder: Path) -> subprocess.CompletedProcess:
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


# --------------------------------------------------------------------------- checkpoints and timm models


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """``a`` and ``b`` have the same tensor names, in the same order, with equal values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_load_refused(model: torch.nn.Module, path: Path, pattern: str) -> None:
    """``load_pretrained(model, path)`` raises a ``CheckpointError`` matching ``pattern`` and changes nothing."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def clear_load_error(model: torch.nn.Module, path: Path, pattern: str) -> CheckpointError:
    """The ``CheckpointError`` of ``load_pretrained(model, path)``: it matches ``pattern``, names the file and is not
    chained to the error underneath (a torch traceback)."""
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_pretrained(model, path)
    error = info.value
    assert str(path) in str(error)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


def seeded_images(size: int = 64, n: int = 1, seed: int = 0) -> torch.Tensor:
    """A float32 batch of ``n`` random RGB images, ``size`` pixels square."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_timm_model(**kwargs) -> RevColClassifier:
    """``timm.create_model("revcol_tiny", **kwargs)`` with non-trivial weights (layer scale 1e-6 would make every
    block nearly the identity)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", **kwargs)
    randomize_(model, seed=1)
    return model
