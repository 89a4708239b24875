"""The download cache of published weights: torch's hub folder, which URLs to try, and downloading into it.

Nothing here touches the network until ``download`` is called for a file that is not cached. The transfer is
``revcol.weights._http``'s (``requests``); the file is written through ``revcol._atomic``, the writer every file of
revcol goes through. How downloads stay bounded and leave nothing behind: ``docs/reliability.md``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.hub

from revcol._atomic import new_file, replace_atomically, sweep
from revcol.checkpoints.backbone import read_backbone
from revcol.checkpoints.files import describe_kind
from revcol.errors import CheckpointError
from revcol.weights._http import Bounds, FetchFailed, fetch, without_credentials
from revcol.weights.published import WEIGHTS, PublishedWeights

__all__ = [
    "CHUNK_BYTES",
    "DEADLINE_BASE_S",
    "MIN_BYTES_PER_WINDOW",
    "MIN_RATE",
    "TIMEOUT_S",
    "URL_ENV",
    "cache_dir",
    "cache_path",
    "candidate_urls",
    "download",
    "is_cached",
    "sweep_partial_files",
    "without_credentials",
]


URL_ENV = "REVCOL_WEIGHTS_URL"  # replaces both bases: a local mirror (all files in one folder), or a test server


TIMEOUT_S = 30.0  # connecting, and each read of the socket: a stalled server fails instead of hanging


CHUNK_BYTES = 1 << 20


# Each TIMEOUT_S window of a download must bring at least this much, so a server trickling a byte now and then
# cannot hold a call for long by never letting one read time out.
MIN_BYTES_PER_WINDOW = 64 << 10


# A download (one URL) must finish within DEADLINE_BASE_S + size / MIN_RATE (size: Content-Length, else the bound).
DEADLINE_BASE_S = 120.0


MIN_RATE = 64 << 10  # bytes per second on average: a slower link is better served by a copy fetched by hand


def cache_dir() -> Path:
    """Torch's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, read at each call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(entry: PublishedWeights) -> Path:
    """Where ``entry`` is (or will be) cached, under the authors' file name."""
    return cache_dir() / entry.filename


def is_cached(entry: PublishedWeights) -> bool:
    """Whether ``entry``'s file is in the cache (a regular file under its name), so loading it needs no network.

    Whether it is a good checkpoint is ``revcol.weights.pretrained.check_published``'s question.
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
        except FetchFailed as failure:
            failures.append(f"  {without_credentials(url)[0]}: {failure}")
    raise CheckpointError(
        f"could not download {entry.filename} ({entry.variant} {entry.tag} weights); tried:\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and put it at {target}, or pass a checkpoint path as pretrained."
    )


def sweep_partial_files(folder: Path, names: list[str]) -> list[Path]:
    """Remove the temporary files that killed downloads of ``names`` (and of every published file) left in
    ``folder``; returns those removed. A file a live download is writing is locked by it and kept."""
    return sweep(folder, [*names, *(e.filename for tags in WEIGHTS.values() for e in tags.values())])


def _fetch_into_place(url: str, target: Path, limit: int, progress: bool) -> None:
    """Download ``url`` into a temporary file beside ``target``, check it, then rename it to ``target``.

    Each attempt writes its own temporary file, so concurrent downloads never share one, and whichever finishes
    last replaces a good file with another good one.
    """
    if progress:
        sys.stderr.write(f'Downloading "{without_credentials(url)[0]}" to {target}\n')
    # read at each call, so that a value set at run time (a test's short deadline) applies
    bounds = Bounds(TIMEOUT_S, MIN_BYTES_PER_WINDOW, DEADLINE_BASE_S, MIN_RATE, CHUNK_BYTES)

    def write(temporary: Path) -> None:
        try:
            file = new_file(temporary)
        except OSError as error:
            raise _unwritable(target.parent, error) from None
        with file:
            fetch(url, file, limit, bounds, progress)
        _check_checkpoint(temporary, target.name)

    try:
        replace_atomically(target, write)
    except OSError as error:  # the lock file, the sync or the rename: the folder, not the URL
        raise _unwritable(target.parent, error) from None


def _unwritable(folder: Path, error: OSError) -> CheckpointError:
    reason = error.strerror or str(error) or type(error).__name__
    return CheckpointError(
        f"cannot write to the weights cache {folder} ({reason}); set TORCH_HOME to a writable folder"
    )


def _check_checkpoint(path: Path, filename: str) -> None:
    """``FetchFailed`` unless ``path`` is a readable RevCol checkpoint (an HTML error page, a damaged file)."""
    try:
        read_backbone(path)
    except CheckpointError as error:
        # report it under the file's own name: the temporary file is gone by the time anyone reads this
        raise FetchFailed(str(error).replace(str(path), filename)) from None
