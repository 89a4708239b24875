"""The authors' published weights: the table, torch's hub cache, downloading, and what ``pretrained=`` means.

Nothing here touches the network until ``download`` (or ``resolve``) is called for a file that is not cached.
How downloads stay bounded and leave nothing behind: ``docs/reliability.md``.
"""

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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch.hub

from revcol.errors import CheckpointError
from revcol.pretrained import describe_kind, read_backbone

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which is all the sweep needs
    fcntl = None

PRIMARY_BASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"
MIRROR_ROOT = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/"
MIRROR_BASE = MIRROR_ROOT + "classification/"
URL_ENV = "REVCOL_WEIGHTS_URL"  # replaces both bases: a local mirror (all files in one folder), or a test server
TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server fails instead of hanging
CHUNK_BYTES = 1 << 20
# Each TIMEOUT_S window of a download must bring at least this much, so a server trickling a byte now and then
# cannot hold a call for long by never letting one read time out.
MIN_BYTES_PER_WINDOW = 64 << 10
# A download (one URL) must finish within DEADLINE_BASE_S + size / MIN_RATE (size: Content-Length, else the bound).
DEADLINE_BASE_S = 120.0
MIN_RATE = 64 << 10  # bytes per second on average: a slower link is better served by a copy fetched by hand
# float32, six times over: the model, an EMA copy, the two Adam moments of an optimizer state, and room to spare
BYTES_PER_PARAMETER = 4 * 6
SIZE_SLACK = 256 << 20
MAX_DOWNLOAD_BYTES = 64 << 30  # the bound of a file whose parameter count is not published


@dataclass(frozen=True)
class PublishedWeights:
    """One file of the authors' release: the variant it fits, its tag, and how it was trained and scored."""

    variant: str
    tag: str
    filename: str
    resolution: int  # input size of the training (ImageNet; ADE20K: crop; COCO: test scale's short side)
    top1: float | None  # ImageNet-1k top-1 accuracy in %; None for the pretraining-only files (22k, MegData)
    num_classes: int | None  # of the classification heads in the file (not loaded); None: not published / none
    in_release: bool = True  # False: the file is only on the authors' Hugging Face repository
    folder: str = "classification"  # its folder there (classification, detection, segmentation)
    trained_for: str = "ImageNet classification"
    scores: tuple[tuple[str, float], ...] = ()  # a downstream file's published results, e.g. (("box AP", 50.8),)
    kernel_size: int = 3  # of the depthwise convolutions: the model that loads this file has to be built with it
    params_m: float | None = None  # the authors' parameter count of the model in the file, in millions

    @property
    def url(self) -> str:
        """Where the file is fetched first: the authors' GitHub release, or the mirror for a file not in it."""
        return PRIMARY_BASE + self.filename if self.in_release else self.mirror_url

    @property
    def mirror_url(self) -> str:
        """The same file in the authors' Hugging Face repository, under its folder."""
        base = MIRROR_BASE if self.folder == "classification" else f"{MIRROR_ROOT}{self.folder}/"
        return base + self.filename

    @property
    def max_bytes(self) -> int:
        """The most a download of this file may bring: generous for its parameter count, else a fixed cap."""
        if self.params_m is None:
            return MAX_DOWNLOAD_BYTES
        return int(self.params_m * 1e6) * BYTES_PER_PARAMETER + SIZE_SLACK

    @property
    def is_downstream(self) -> bool:
        """A detector's or segmenter's file: only its backbone is loaded."""
        return self.folder != "classification"


_COCO = "COCO detection, Cascade Mask R-CNN 3x (mmdetection)"
_ADE = "ADE20K segmentation, UperNet 160k (mmsegmentation)"


def _coco(variant: str, tag: str, filename: str, box: float, mask: float, params_m: float) -> PublishedWeights:
    scores = (("box AP", box), ("mask AP", mask))
    return PublishedWeights(
        variant, tag, filename, 800, None, None, False, "detection", _COCO, scores, params_m=params_m
    )


def _ade(variant: str, tag: str, filename: str, crop: int, miou: float, ms: float, params_m: float, kernel=3):
    scores = (("mIoU", miou), ("mIoU ms+flip", ms))
    return PublishedWeights(
        variant, tag, filename, crop, None, None, False, "segmentation", _ADE, scores, kernel, params_m
    )


_PUBLISHED = (
    PublishedWeights("revcol_tiny", "in1k", "revcol_tiny_1k.pth", 224, 82.2, 1000, params_m=30),
    PublishedWeights("revcol_small", "in1k", "revcol_small_1k.pth", 224, 83.5, 1000, params_m=60),
    PublishedWeights("revcol_base", "in1k", "revcol_base_1k.pth", 224, 84.1, 1000, params_m=138),
    PublishedWeights("revcol_base", "in22k", "revcol_base_22k.pth", 224, None, 21841, params_m=138),
    PublishedWeights("revcol_base", "in22k_ft_in1k", "revcol_base_22k_1kft_224.pth", 224, 85.6, 1000, params_m=138),
    PublishedWeights("revcol_base", "in22k_ft_in1k_384", "revcol_base_22k_1kft_384.pth", 384, 86.7, 1000, params_m=138),
    PublishedWeights("revcol_large", "in22k", "revcol_large_22k.pth", 224, None, 21841, params_m=273),
    PublishedWeights("revcol_large", "in22k_ft_in1k", "revcol_large_22k_1kft_224.pth", 224, 86.6, 1000, params_m=273),
    PublishedWeights(
        "revcol_large", "in22k_ft_in1k_384", "revcol_large_22k_1kft_384.pth", 384, 87.6, 1000, params_m=273
    ),
    # RevCol-H: pretrained on the authors' MegData-168M (number of classes not published), fine-tuned at 640 px.
    PublishedWeights(
        "revcol_huge", "megdata", "revcol_huge_megdata.pth", 224, None, None, in_release=False, params_m=2100
    ),
    PublishedWeights(
        "revcol_huge", "megdata_ft_in1k", "revcol_huge_megdata_in1k.pth", 640, 90.0, 1000, False, params_m=2100
    ),
    # Downstream: the authors' Detection/README.md and Segmentation/README.md (parameters of the whole detector
    # or segmenter, as published: UperNet-B's 122 M is below its backbone's 138 M). Their backbones are ImageNet
    # (or MegData) initialised, then trained with the task.
    _coco("revcol_tiny", "in1k_ft_coco", "cmr_tiny_3x_in1k_AP508.pth", 50.8, 44.0, 88),
    _coco("revcol_small", "in1k_ft_coco", "cmr_revcol_small_3x_in1k.pth", 52.6, 45.5, 118),
    _coco("revcol_base", "in1k_ft_coco", "cmr_base_3x_in1k.pth", 53.0, 45.9, 196),
    _coco("revcol_base", "in22k_ft_coco", "cmr_base_3x_in22k_AP55.pth", 55.0, 47.5, 196),
    _coco("revcol_large", "in22k_ft_coco", "cmr_large_3x_in22k_AP559.pth", 55.9, 48.4, 330),
    _ade("revcol_tiny", "in1k_ft_ade20k", "upernet_revcol_tiny_fp16_512x512_160k_ade20k.pth", 512, 47.4, 47.6, 60),
    _ade("revcol_small", "in1k_ft_ade20k", "upernet_revcol_small_fp16_512x512_160k_ade20k.pth", 512, 47.9, 49.0, 90),
    _ade("revcol_base", "in1k_ft_ade20k", "upernet_revcol_base_512x512_160k_ade20k.pth", 512, 49.0, 50.1, 122),
    _ade("revcol_base", "in22k_ft_ade20k", "upernet_revcol_base_640x640_160k_ade20k.pth", 640, 52.7, 53.3, 122),
    _ade("revcol_large", "in22k_ft_ade20k", "upernet_revcol_large_fp16_640x640_160k_ade20k.pth", 640, 53.4, 53.7, 306),
    _ade(
        "revcol_huge", "megdata_ft_ade20k", "upernet_revcol_huge_fp16_640x640_160k_ade20k.pth", 640, 57.8, 58.0, 2421, 7
    ),
    # The initialisation of that UperNet: the MegData backbone with its depthwise kernels padded to 7x7.
    PublishedWeights(
        "revcol_huge",
        "megdata_k7",
        "revcol_huge_k7padded.pth",
        224,
        None,
        None,
        False,
        "segmentation",
        "MegData-168M pretraining, depthwise kernels padded to 7x7 afterwards",
        kernel_size=7,
        params_m=2160,  # not published: RevCol-H's 2155 M with 7x7 instead of 3x3 kernels
    ),
)


def _by_variant(entries: tuple[PublishedWeights, ...]) -> dict[str, dict[str, PublishedWeights]]:
    table: dict[str, dict[str, PublishedWeights]] = {}
    for entry in entries:
        table.setdefault(entry.variant, {})[entry.tag] = entry
    return table


# variant -> tag -> file. revcol_xlarge has no published file, so no entry.
WEIGHTS: dict[str, dict[str, PublishedWeights]] = _by_variant(_PUBLISHED)
# What pretrained=True loads: the best 224-px ImageNet-1k classifier of each variant (RevCol-H has only a 640-px one).
DEFAULT_TAGS: dict[str, str] = {
    "revcol_tiny": "in1k",
    "revcol_small": "in1k",
    "revcol_base": "in22k_ft_in1k",
    "revcol_large": "in22k_ft_in1k",
    "revcol_huge": "megdata_ft_in1k",
}


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


def resolve(variant: str | None, pretrained: bool | str | os.PathLike) -> Path:
    """The checkpoint file that ``pretrained`` names for ``variant`` (``None``: a custom configuration).

    ``True``: the variant's default published weights (``DEFAULT_TAGS``); one of its tags (``WEIGHTS``):
    that file. Both are downloaded once into torch's hub cache. Anything else is a local path (``~``
    expanded); whether it exists is checked when it is read. A tag takes precedence over a file of the
    same name in the working directory (write ``./in1k`` for the file). ``False`` and ``None`` mean "load
    nothing" and are the caller's to skip.
    """
    entry = named_entry(variant, pretrained)
    return download(entry) if entry is not None else Path(pretrained).expanduser()


def named_entry(variant: str | None, pretrained: bool | str | os.PathLike) -> PublishedWeights | None:
    """The published file that ``pretrained`` names for ``variant`` (as ``resolve``), ``None`` for a path.

    Decided from the table alone, without the network, so a model is never built for weights that do not
    exist: ``CheckpointError`` for a variant without published files, an unknown tag or a bad value.
    """
    if pretrained is True:
        return _published(variant)[DEFAULT_TAGS[variant]]
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise CheckpointError(f"pretrained must be True, a published tag or a checkpoint path, got {pretrained!r}")
    if isinstance(pretrained, str):  # only a string can be a tag: a Path object always means a file
        tags = WEIGHTS.get(variant or "", {})
        if pretrained in tags:
            return tags[pretrained]
        if _looks_like_tag(pretrained):
            tags = _published(variant, asked=pretrained)  # raises if the variant has no published file at all
            downstream = [tag for tag, entry in tags.items() if entry.is_downstream]
            also = f"; the backbones of its COCO and ADE20K models: {', '.join(downstream)}" if downstream else ""
            raise CheckpointError(
                f"{variant} has no published weights tagged {pretrained!r} and there is no such file; "
                f"its tags: {', '.join(t for t in tags if t not in downstream)} (or give a checkpoint path){also}"
            )
    return None


def _published(variant: str | None, asked: str | None = None) -> dict[str, PublishedWeights]:
    """The published files of ``variant``; ``CheckpointError`` when it has none (a custom configuration, RevCol-XL)."""
    which = "" if asked is None else f" (asked for {asked!r}, and there is no such file)"
    if variant is None:
        raise CheckpointError(
            f"no published weights exist for a custom RevCol configuration{which}; give a checkpoint path"
        )
    if variant not in WEIGHTS:
        raise CheckpointError(
            f"no published weights exist for {variant}{which}; variants with published weights: "
            f"{', '.join(WEIGHTS)}; give a checkpoint path"
        )
    return WEIGHTS[variant]


def _looks_like_tag(text: str) -> bool:
    """A bare word that is no existing file: no folder, no suffix, no ``~`` (a tag never has these)."""
    path_marks = {os.sep, os.altsep or os.sep, ".", "~"}
    return not text or (not any(mark in text for mark in path_marks) and not Path(text).exists())
