"""The authors' published ImageNet weights: the table, torch's hub cache, downloading, and what ``pretrained=`` means.

Nothing here touches the network until ``download`` (or ``resolve``) is called for a file that is not cached.
"""

from __future__ import annotations

import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch.hub

from revcol.errors import CheckpointError
from revcol.pretrained import read_backbone

PRIMARY_BASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"
MIRROR_BASE = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/classification/"
URL_ENV = "REVCOL_WEIGHTS_URL"  # replaces both bases: a local mirror, or a test server
TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server fails instead of hanging
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PublishedWeights:
    """One file of the authors' release: the variant it fits, its tag, and how it was trained and scored."""

    variant: str
    tag: str
    filename: str
    resolution: int  # input size of the training (and of the top-1 score)
    top1: float | None  # ImageNet-1k top-1 accuracy in %; None for the pretraining-only files (22k, MegData)
    num_classes: int | None  # of the classification heads in the file (not loaded); None: not published
    in_release: bool = True  # False: the file is only on the authors' Hugging Face mirror

    @property
    def url(self) -> str:
        """Where the file is fetched first: the authors' GitHub release, or the mirror for a file not in it."""
        return PRIMARY_BASE + self.filename if self.in_release else self.mirror_url

    @property
    def mirror_url(self) -> str:
        """The same file in the authors' Hugging Face repository."""
        return MIRROR_BASE + self.filename


_PUBLISHED = (
    PublishedWeights("revcol_tiny", "in1k", "revcol_tiny_1k.pth", 224, 82.2, 1000),
    PublishedWeights("revcol_small", "in1k", "revcol_small_1k.pth", 224, 83.5, 1000),
    PublishedWeights("revcol_base", "in1k", "revcol_base_1k.pth", 224, 84.1, 1000),
    PublishedWeights("revcol_base", "in22k", "revcol_base_22k.pth", 224, None, 21841),
    PublishedWeights("revcol_base", "in22k_ft_in1k", "revcol_base_22k_1kft_224.pth", 224, 85.6, 1000),
    PublishedWeights("revcol_base", "in22k_ft_in1k_384", "revcol_base_22k_1kft_384.pth", 384, 86.7, 1000),
    PublishedWeights("revcol_large", "in22k", "revcol_large_22k.pth", 224, None, 21841),
    PublishedWeights("revcol_large", "in22k_ft_in1k", "revcol_large_22k_1kft_224.pth", 224, 86.6, 1000),
    PublishedWeights("revcol_large", "in22k_ft_in1k_384", "revcol_large_22k_1kft_384.pth", 384, 87.6, 1000),
    # RevCol-H: pretrained on the authors' MegData-168M (number of classes not published), fine-tuned at 640 px.
    PublishedWeights("revcol_huge", "megdata", "revcol_huge_megdata.pth", 224, None, None, in_release=False),
    PublishedWeights(
        "revcol_huge", "megdata_ft_in1k", "revcol_huge_megdata_in1k.pth", 640, 90.0, 1000, in_release=False
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
    """Whether ``entry`` is in the cache, so loading it needs no network."""
    return cache_path(entry).is_file()


def candidate_urls(entry: PublishedWeights) -> list[str]:
    """The URLs ``download`` tries in turn: ``$REVCOL_WEIGHTS_URL`` alone if set, else the release (for a file
    in it), then the mirror."""
    base = os.environ.get(URL_ENV)
    if base:
        return [base.rstrip("/") + "/" + entry.filename]
    return [entry.url, entry.mirror_url] if entry.in_release else [entry.mirror_url]


def download(entry: PublishedWeights, progress: bool = True) -> Path:
    """The cached file of ``entry``, fetched first if needed; ``CheckpointError`` if no URL delivers it.

    The file appears under its final name only once complete and readable, so an interrupted or
    concurrent download never leaves a partial file there.
    """
    target = cache_path(entry)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(target.parent, error) from None
    failures = []
    for url in candidate_urls(entry):
        try:
            _fetch_into_place(url, target, progress)
            return target
        except _FetchFailed as failure:
            failures.append(f"  {url}: {failure}")
    raise CheckpointError(
        f"could not download {entry.filename} ({entry.variant} {entry.tag} weights); tried:\n"
        + "\n".join(failures)
        + f"\nDownload it by hand and put it at {target}, or pass a checkpoint path as pretrained."
    )


def _fetch_into_place(url: str, target: Path, progress: bool) -> None:
    """Download ``url`` into a temporary file beside ``target``, check it, then rename it to ``target``."""
    # One temporary file per attempt: concurrent downloads never share a file, and os.replace is atomic,
    # so whichever finishes last replaces a good file with another good one.
    if progress:
        sys.stderr.write(f'Downloading "{url}" to {target}\n')
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as error:
        raise _unwritable(target.parent, error) from None
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            _copy_url(url, file, progress)
        _check_checkpoint(partial, target.name)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _unwritable(folder: Path, error: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write to the weights cache {folder} ({_describe(error)}); set TORCH_HOME to a writable folder"
    )


def _copy_url(url: str, file: BinaryIO, progress: bool) -> None:
    """Write the body of ``url`` to ``file``; ``_FetchFailed`` on HTTP errors, network errors and short bodies."""
    expected = None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            expected = _content_length(response)
            _copy_body(response, file, expected, progress)
    except urllib.error.HTTPError as error:
        error.close()
        raise _FetchFailed(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:  # refused, unknown host, TLS: the reason is the useful part
        raise _FetchFailed(_describe(error.reason)) from None
    except http.client.IncompleteRead as error:
        raise _FetchFailed(_truncated(file.tell() + len(error.partial), expected)) from None
    except (OSError, http.client.HTTPException) as error:  # timeouts and resets mid-body
        raise _FetchFailed(_describe(error)) from None
    if expected is not None and file.tell() != expected:
        # http.client ends a body that stops short of Content-Length silently: count the bytes instead
        raise _FetchFailed(_truncated(file.tell(), expected))


def _truncated(received: int, expected: int | None) -> str:
    return f"truncated: got {received} of {expected} bytes" if expected else f"truncated after {received} bytes"


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _copy_body(response: http.client.HTTPResponse, file: BinaryIO, expected: int | None, progress: bool) -> None:
    with torch.hub.tqdm(total=expected, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
        while chunk := response.read(CHUNK_BYTES):
            file.write(chunk)
            bar.update(len(chunk))


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
    if pretrained is True:
        return download(_published(variant)[DEFAULT_TAGS[variant]])
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike)):
        raise CheckpointError(f"pretrained must be True, a published tag or a checkpoint path, got {pretrained!r}")
    if isinstance(pretrained, str):  # only a string can be a tag: a Path object always means a file
        tags = WEIGHTS.get(variant or "", {})
        if pretrained in tags:
            return download(tags[pretrained])
        if _looks_like_tag(pretrained):
            tags = _published(variant, asked=pretrained)  # raises if the variant has no published file at all
            raise CheckpointError(
                f"{variant} has no published weights tagged {pretrained!r} and there is no such file; "
                f"its tags: {', '.join(tags)} (or give a checkpoint path)"
            )
    return Path(pretrained).expanduser()


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
