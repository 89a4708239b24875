"""Which Ultralytics releases revcol supports, and the release each head of a model YAML needs.

The supported range is read from revcol's package metadata (``pyproject.toml``); ``HEADS_SINCE`` is the one table
of heads that not every release has. ``revcol info`` and the docs print both from here."""

from __future__ import annotations

import importlib.metadata
import re

from revcol.errors import ConfigError
from revcol.ultralytics.yaml_rows import head_modules


def supported_ultralytics() -> str:
    """The Ultralytics versions this installation of revcol supports, as its package metadata declares them."""
    try:
        requirements = importlib.metadata.requires("revcol") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("revcol is not installed, so its Ultralytics range is unknown: pip install .") from None
    for requirement in requirements:
        match = re.fullmatch(r"ultralytics\s*([<>=!~][^;]*)", requirement.strip())
        if match:
            return match.group(1).replace(" ", "")
    raise RuntimeError(f"revcol's metadata names no Ultralytics version range: {requirements}")


# Heads that Ultralytics added during its 8.4 series, and the release that added each: a RevCol model naming one on
# an older release gets that version in the error rather than Ultralytics' bare KeyError. A release below the
# supported floor (see ``head_release``) is kept as Ultralytics published it.
HEADS_SINCE = {"SemanticSegment": "8.4.52", "Depth": "8.4.104"}


def supported_range() -> str:
    """``supported_ultralytics()`` written lower bound first, as in ``pyproject.toml`` (e.g. ``>=8.4.67,<9``)."""
    return ",".join(sorted(supported_ultralytics().split(","), key=lambda spec: not spec.startswith(">")))


def supported_floor() -> str:
    """The oldest supported Ultralytics release (the ``>=`` bound of ``supported_ultralytics()``)."""
    match = re.search(r">=\s*([\d.]+)", supported_ultralytics())
    if match is None:
        raise RuntimeError(f"revcol's Ultralytics range {supported_ultralytics()!r} has no >= floor")
    return match.group(1)


def head_release(name: str) -> str:
    """The oldest supported Ultralytics release that has head ``name``: its ``HEADS_SINCE`` entry or the floor."""
    floor = supported_floor()
    since = HEADS_SINCE.get(name)
    if since is None:
        return floor
    return max(since, floor, key=lambda version: tuple(int(part) for part in version.split(".")))


def check_heads(d: dict) -> None:
    """Refuse a model dict whose head this Ultralytics does not have yet, naming the release that has it."""
    import ultralytics
    from ultralytics.utils.checks import check_version

    for name in head_modules(d):
        since = HEADS_SINCE.get(name)
        if since and not check_version(ultralytics.__version__, f">={since}"):
            raise ConfigError(
                f"head {name!r} needs ultralytics>={since}; this is ultralytics {ultralytics.__version__}. "
                f"Upgrade: pip install 'ultralytics>={since}'"
            )
