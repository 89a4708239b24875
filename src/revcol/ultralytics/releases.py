"""RevCol in Ultralytics: the backbone layer, what Ultralytics' safe load may restore, the wrappers of its functions.

The YAML row that names a backbone is expanded by ``revcol.contract``; ``revcol.hooks`` installs the wrappers
below (``register()``). Nothing here patches anything by itself (``docs/design.md``, section "YAML contract")."""

from __future__ import annotations

import importlib.metadata
import re

from revcol.errors import ConfigError
from revcol.ultralytics.yaml_rows import (
    head_modules,
)


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


# Heads that Ultralytics added after the oldest release revcol supports, and the release that added each: a RevCol
# model naming one on an older release gets that version in the error rather than Ultralytics' bare KeyError.
HEADS_SINCE = {"SemanticSegment": "8.4.52", "Depth": "8.4.104"}


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
