"""The authors' published weights: the table, torch's hub cache, downloading, and what ``pretrained=`` means.

Nothing here touches the network until ``download`` (or ``resolve``) is called for a file that is not cached.
How downloads stay bounded and leave nothing behind: ``docs/reliability.md``."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import secrets
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch.hub

from revcol.checkpoints.backbone import read_backbone
from revcol.checkpoints.files import describe_kind
from revcol.errors import CheckpointError
from revcol.weights.published import WEIGHTS, PublishedWeights

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which is all the sweep needs
    fcntl = None


URL_ENV = "REVCOL_WEIGHTS_URL"  # replaces both bases: a local mirror (all files in one folder), or a test server


TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server fails instead of hanging


CHUNK_BYTES = 1 << 20


# Each TIMEOUT_S window of a download must bring at least this much, so a server trickling a byte now and then
# cannot hold a call for long by never letting one read time out.
MIN_BYTES_PER_WINDOW = 64 << 10


# A download (one URL) must finish within DEADLINE_BASE_S + size / MIN_RATE (size: Content-Length, else the bound).
DEADLINE_BASE_S = 120.0


MIN_RATE = 64 << 10  # bytes per second on average: a slower link is better served by a copy fetched by hand


class _FetchFailed(Exception):
    """One URL did not deliver a readable checkpoint; the message is the short reason."""


def cache_dir() -> Path:
    """Torch's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, read at each call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(entry: PublishedWeights) -> Path:
    """Where ``entry`` is (or will be) cached, under the authors' file name."""
    return cache_dir() / entry.filename


def is_cached(entry: PublishedWeights) -> bool:
    """Whether ``entry``'s file is in the cache (a regular file under its name), so loading it needs no network.

    Whether it is a good checkpoint is ``revcol.variants.check_published``'s question.
    """
    return cache_path(entry).is_file()


def candidate_urls(entry: PublishedWeights) -> list[str]:
    """The URLs ``download`` tries in turn: ``$REVCOL_WEIGHTS_URL`` alone if set, else the release (for a file
    in it), then the mirror."""
    base = os.environ.get(URL_ENV)
    if base:
        return [base.rstrip("/") + "/" + entry.filename]
    return [entry.url, entry.mirror_url] if entry.in_release else [entry.mirror_url]


def download(entry: PublishedWeights, progress: bool = True, replace: bool = False) -> Path:
    """The cached file of ``entry``, fetched first if needed; ``CheckpointError`` if no URL delivers it.

    ``replace``: fetch it even if a file is cached, and put the new one in its place once it is complete.
    The file appears under its final name only once complete and readable, so an interrupted or concurrent
    download never leaves a partial file there; what a killed download left is removed by the next one.
    """
    target = cache_path(entry)
    if target.is_file() and not replace:
        sweep_partial_files(target.parent, [target.name])
        return target
    if os.path.lexists(target) and not target.is_file():
        # found before downloading: the rename at the end could not replace it
        raise CheckpointError(
            f"the weights cache has {describe_kind(target)} at {target}, where {entry.filename} belongs; "
            "remove it (or set TORCH_HOME to another folder)"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(target.parent, error) from None
    sweep_partial_files(target.parent, [target.name])
    failures = []
    for url in candidate_urls(entry):
        try:
            _fetch_into_place(url, target, entry.max_bytes, progress)
            return target
        except _FetchFailed as failure:
            failures.append(f"  {without_credentials(url)[0]}: {failure}")
    raise CheckpointError(
        f"could not download {entry.filename} ({entry.variant} {entry.tag} weights); tried:\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and put it at {target}, or pass a checkpoint path as pretrained."
    )


def _fetch_into_place(url: str, target: Path, limit: int, progress: bool) -> None:
    """Download ``url`` into a temporary file beside ``target``, check it, then rename it to ``target``."""
    # One temporary file per attempt: concurrent downloads never share a file, and os.replace is atomic,
    # so whichever finishes last replaces a good file with another good one.
    if progress:
        sys.stderr.write(f'Downloading "{without_credentials(url)[0]}" to {target}\n')
    with _partial_file(target) as (partial, file):
        _copy_url(url, file, limit, progress)
        file.flush()
        os.fsync(file.fileno())  # the rename below must never publish a file whose data is still in flight
        _check_checkpoint(partial, target.name)
        os.replace(partial, target)


def without_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its ``user:password@`` part, and that part as an HTTP Basic ``Authorization`` value.

    urllib takes ``user:password@host`` for a host name; the credentials are sent as a header instead, and only the
    URL without them ever appears in a message.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    user, _, password = parts.netloc.rpartition("@")[0].partition(":")
    credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(credentials).decode()


def _partial_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(8)}.part"


@contextlib.contextmanager
def _partial_file(target: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A new temporary file beside ``target``, locked for as long as it is open, removed on the way out.

    Created like any file (mode 0666 less the umask, as ``open`` and ``torch.hub`` do), not 0600 as ``mkstemp``
    would, so a cache filled by one user is readable by the others. The lock tells ``sweep_partial_files``
    that a live process owns it; what a killed process leaves is unlocked, so the next download removes it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(3):
        partial = _partial_name(target)
        try:
            fd = os.open(partial, flags, 0o666)
        except OSError as error:
            raise _unwritable(target.parent, error) from None
        if fcntl is not None:
            # a filesystem without locks (some network mounts) cannot lock for the sweep either, which then keeps all
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(partial, fd):
            break
        # a sweep took the file between its creation and the lock: take another
        os.close(fd)
    else:
        raise CheckpointError(f"could not create a temporary file in the weights cache {target.parent}")
    try:
        with os.fdopen(fd, "wb") as file:
            yield partial, file
    finally:
        partial.unlink(missing_ok=True)  # gone already when renamed into place


def _same_file(path: Path, fd: int) -> bool:
    try:
        here, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def sweep_partial_files(folder: Path, names: list[str]) -> list[Path]:
    """Remove the temporary files that killed downloads of ``names`` (and of every published file) left in
    ``folder``; returns those removed. A file a live download is writing is locked by it and kept."""
    prefixes = tuple(f".{name}." for name in {*names, *(e.filename for t in WEIGHTS.values() for e in t.values())})
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(prefixes) and p.name.endswith(".part")]
    except OSError:
        return []
    removed = []
    for path in candidates:
        with contextlib.suppress(OSError):
            if _remove_if_abandoned(path):
                removed.append(path)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    if fcntl is None:
        path.unlink()  # raises while the writer still has it open
        return True
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live download holds it
        if not _same_file(path, fd):
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _unwritable(folder: Path, error: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write to the weights cache {folder} ({_describe(error)}); set TORCH_HOME to a writable folder"
    )


class _Watchdog:
    """Shuts the sockets of one download at its deadline, so no read (headers included) outlives it."""

    def __init__(self, seconds: float) -> None:
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.fired:
                _shut(sock)

    def postpone(self, seconds: float) -> None:
        """Move the deadline (once the size is known); a watchdog that already fired stays fired."""
        with self._lock:
            if self.fired:
                return
            self._timer.cancel()
            self._timer = threading.Timer(seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self.sockets:
                _shut(sock)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for a TLS socket: ssl.SSLSocket.shutdown would first drop its TLS state
    # under the reading thread. The blocked read then ends at once.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies, redirects, TLS as usual) whose connections are known to ``watchdog``."""

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self.sock)

    class TLSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.track(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Connection, req)

    class TLSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(TLSConnection, req)

    return urllib.request.build_opener(Handler(), TLSHandler())


def _copy_url(url: str, file: BinaryIO, limit: int, progress: bool) -> None:
    """Write the body of ``url`` to ``file``; ``_FetchFailed`` on HTTP errors, network errors, short or oversized
    bodies and a missed deadline."""
    expected = None
    start = time.monotonic()
    allowed = DEADLINE_BASE_S + limit / MIN_RATE
    with _Watchdog(allowed) as watchdog:
        try:
            address, authorization = without_credentials(url)
            request = urllib.request.Request(address)
            if authorization:  # never forwarded to where a redirect points
                request.add_unredirected_header("Authorization", authorization)
            with _opener(watchdog).open(request, timeout=TIMEOUT_S) as response:
                expected = _content_length(response)
                if expected is not None and expected > limit:
                    raise _FetchFailed(f"the server announces {expected} bytes, more than the {limit} this file can be")
                if expected is not None:
                    allowed = DEADLINE_BASE_S + expected / MIN_RATE
                    watchdog.postpone(max(0.0, start + allowed - time.monotonic()))
                _copy_body(response, file, expected, limit, progress)
        except urllib.error.HTTPError as error:
            error.close()
            raise _FetchFailed(f"HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            if watchdog.fired:
                raise _FetchFailed(_late(allowed, file.tell(), expected)) from None
            if isinstance(error, urllib.error.URLError):  # refused, unknown host, TLS: the reason is the useful part
                raise _FetchFailed(_describe(error.reason)) from None
            if isinstance(error, http.client.IncompleteRead):
                raise _FetchFailed(_truncated(file.tell() + len(error.partial), expected)) from None
            raise _FetchFailed(_describe(error)) from None  # timeouts and resets mid-body
    if watchdog.fired:
        raise _FetchFailed(_late(allowed, file.tell(), expected))
    if expected is not None and file.tell() != expected:
        # http.client ends a body that stops short of Content-Length silently: count the bytes instead
        raise _FetchFailed(_truncated(file.tell(), expected))


def _late(allowed: float, received: int, expected: int | None) -> str:
    of = f" of {expected}" if expected else ""
    return f"not finished within its deadline of {allowed:.1f} s (got {received}{of} bytes)"


def _truncated(received: int, expected: int | None) -> str:
    return f"truncated: got {received} of {expected} bytes" if expected else f"truncated after {received} bytes"


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _copy_body(
    response: http.client.HTTPResponse, file: BinaryIO, expected: int | None, limit: int, progress: bool
) -> None:
    received = 0
    window_start, window_bytes = time.monotonic(), 0
    with torch.hub.tqdm(total=expected, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        # read1: at most one read from the socket per call, so the checks below run between any two of them
        while chunk := response.read1(CHUNK_BYTES):
            received += len(chunk)
            if received > limit:
                raise _FetchFailed(f"the body is longer than the {limit} bytes this file can be; stopped there")
            file.write(chunk)
            bar.update(len(chunk))
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= TIMEOUT_S:
                if window_bytes < MIN_BYTES_PER_WINDOW:
                    raise _FetchFailed(
                        f"too slow: {window_bytes} bytes in {now - window_start:.1f} s "
                        f"(at least {MIN_BYTES_PER_WINDOW} every {TIMEOUT_S:g} s are needed)"
                    )
                window_start, window_bytes = now, 0


def _describe(error: BaseException | str) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {TIMEOUT_S:g} s"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # "Connection refused" rather than "[Errno 111] Connection refused"
    return str(error) or type(error).__name__


def _check_checkpoint(path: Path, filename: str) -> None:
    """``_FetchFailed`` unless ``path`` is a readable RevCol checkpoint (an HTML error page, a damaged file)."""
    try:
        read_backbone(path)
    except CheckpointError as error:
        # report it under the file's own name: the temporary file is gone by the time anyone reads this
        raise _FetchFailed(str(error).replace(str(path), filename)) from None
