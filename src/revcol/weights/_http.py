"""One bounded HTTP download: ``requests`` (streamed, connect and read timeouts), ``tqdm`` for progress.

Bounded without reaching into a socket: the request runs in a daemon thread that is given up at the deadline, so a
server trickling its status line and headers cannot hold the call; then every read of the body waits at most the read
timeout and the clock is checked after each, so a body trickled or stalled ends within the deadline and one read
timeout. How the bounds are chosen: ``docs/reliability.md``.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

import requests
import urllib3
from tqdm import tqdm


@dataclass(frozen=True)
class Bounds:
    """How long and how slow one download may be."""

    timeout_s: float  # connecting, and each read of the socket
    min_bytes_per_window: int  # each timeout_s window of the body must bring this much
    deadline_base_s: float  # the whole download: deadline_base_s + size / min_rate
    min_rate: float  # bytes per second
    chunk_bytes: int  # at most this much per read

    def deadline_s(self, size: int) -> float:
        """Seconds a download of ``size`` bytes may take from its request to its last byte."""
        return self.deadline_base_s + size / self.min_rate


class FetchFailed(Exception):
    """One URL did not deliver its body; the message is the short reason."""


def without_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its ``user:password@`` part, and that part as an HTTP Basic ``Authorization`` value.

    The credentials are sent as a header, and only the URL without them ever appears in a message.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    user, _, password = parts.netloc.rpartition("@")[0].partition(":")
    credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(credentials).decode()


def fetch(url: str, file: BinaryIO, limit: int, bounds: Bounds, progress: bool) -> None:
    """Write the body of ``url`` to ``file``: at most ``limit`` bytes, within ``bounds``.

    ``FetchFailed`` on HTTP errors, network errors, short or oversized bodies, a body too slow and a missed deadline.
    A ``file:`` URL (a mirror on a shared disk) is copied, under the same size bound.
    """
    if urllib.parse.urlsplit(url).scheme == "file":
        _copy_local(url, file, limit)
    else:
        _Download(url, limit, bounds).into(file, progress)


def _copy_local(url: str, file: BinaryIO, limit: int) -> None:
    path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would never end
            raise FetchFailed(f"{path} is not a regular file")
        if info.st_size > limit:
            raise FetchFailed(f"the file has {info.st_size} bytes, more than the {limit} this file can be")
        with open(path, "rb") as source:
            shutil.copyfileobj(source, file)
    except OSError as error:
        raise FetchFailed(error.strerror or str(error)) from None


class _Download:
    """The state of one download: when it started, how long it may take, what arrived."""

    def __init__(self, url: str, limit: int, bounds: Bounds) -> None:
        self.url, self.limit, self.bounds = url, limit, bounds
        self.start = time.monotonic()
        self.allowed = bounds.deadline_s(limit)  # until the size is known
        # A deadline shorter than the timeout bounds each read too: a read then cannot outlive it.
        self.timeout = min(bounds.timeout_s, self.allowed)
        self.expected: int | None = None
        self.received = 0

    def into(self, file: BinaryIO, progress: bool) -> None:
        address, authorization = without_credentials(self.url)
        # identity: the bytes counted and written are the file's, as Content-Length announces them
        headers = {"Accept-Encoding": "identity"}
        if authorization:  # requests drops it when a redirect leads to another host
            headers["Authorization"] = authorization
        try:
            with self._response(address, headers) as response:
                self._check_headers(response)
                self._copy(response.raw, file, progress)
        except FetchFailed:
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise FetchFailed(self._reason(error)) from None
        if self.expected is not None and self.received != self.expected:
            raise FetchFailed(self._truncated())

    def _response(self, address: str, headers: dict[str, str]) -> requests.Response:
        """The response to a GET of ``address`` (body not read yet), by the deadline.

        Each read of the status line and headers waits at most the read timeout, but a server could send them a byte
        at a time; so the request runs in a daemon thread and is given up at the deadline. A response that still
        arrives later is closed there.
        """
        done, outcome = threading.Event(), {}

        def get() -> None:
            try:
                outcome["response"] = requests.get(address, headers=headers, stream=True, timeout=(self.timeout,) * 2)
            except BaseException as error:  # handed to the caller's thread as it is
                outcome["error"] = error
            done.set()
            if abandoned.is_set() and "response" in outcome:
                outcome["response"].close()

        abandoned = threading.Event()
        threading.Thread(target=get, name="revcol-download-headers", daemon=True).start()
        if not done.wait(max(0.0, self.allowed - (time.monotonic() - self.start))):
            abandoned.set()
            if done.is_set() and "response" in outcome:  # arrived just now: close it here, not in the thread
                outcome["response"].close()
            raise FetchFailed(self._late())
        if "error" in outcome:
            raise outcome["error"]
        return outcome["response"]

    def _check_headers(self, response: requests.Response) -> None:
        if not 200 <= response.status_code < 300:
            raise FetchFailed(f"HTTP {response.status_code} {response.reason}")
        self._check_deadline()
        value = response.headers.get("Content-Length", "")
        self.expected = int(value) if value.isdigit() else None
        if self.expected is not None and self.expected > self.limit:
            raise FetchFailed(
                f"the server announces {self.expected} bytes, more than the {self.limit} this file can be"
            )
        if self.expected is not None:
            self.allowed = self.bounds.deadline_s(self.expected)

    def _copy(self, raw: urllib3.HTTPResponse, file: BinaryIO, progress: bool) -> None:
        window_start, window_bytes = time.monotonic(), 0
        with tqdm(total=self.expected, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            # read1: at most one read of the socket per call, so the checks below run between any two of them
            while chunk := raw.read1(self.bounds.chunk_bytes, decode_content=False):
                self.received += len(chunk)
                if self.received > self.limit:
                    raise FetchFailed(f"the body is longer than the {self.limit} bytes this file can be; stopped there")
                file.write(chunk)
                bar.update(len(chunk))
                self._check_deadline()
                window_bytes += len(chunk)
                now = time.monotonic()
                if now - window_start >= self.bounds.timeout_s:
                    if window_bytes < self.bounds.min_bytes_per_window:
                        raise FetchFailed(
                            f"too slow: {window_bytes} bytes in {now - window_start:.1f} s (at least "
                            f"{self.bounds.min_bytes_per_window} every {self.bounds.timeout_s:g} s are needed)"
                        )
                    window_start, window_bytes = now, 0

    def _check_deadline(self) -> None:
        if time.monotonic() - self.start >= self.allowed:
            raise FetchFailed(self._late())

    def _late(self) -> str:
        of = f" of {self.expected}" if self.expected else ""
        return f"not finished within its deadline of {self.allowed:.1f} s (got {self.received}{of} bytes)"

    def _truncated(self) -> str:
        if self.expected:
            return f"truncated: got {self.received} of {self.expected} bytes"
        return f"truncated after {self.received} bytes"

    def _reason(self, error: BaseException) -> str:
        """The short reason for a failed request or read, as a person would say it."""
        timed_out = isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError))
        if timed_out and (self.timeout < self.bounds.timeout_s or time.monotonic() - self.start >= self.allowed):
            return self._late()
        if timed_out:
            return f"no answer within {self.bounds.timeout_s:g} s"
        cause = _root_cause(error)
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror  # "Connection refused" rather than "[Errno 111] Connection refused"
        if self.expected is not None and self.received < self.expected:
            return self._truncated()  # the server closed the connection before the announced length
        return str(error) or type(error).__name__


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error that ``error`` wraps (requests wraps urllib3's, which wraps the socket's)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None)  # urllib3's MaxRetryError
        if not isinstance(inner, BaseException):
            inner = error.__cause__ or error.__context__
        if inner is None and error.args and isinstance(error.args[0], BaseException):
            inner = error.args[0]  # requests' ConnectionError keeps urllib3's error as its argument
        if inner is None:
            break
        error = inner
    return error
