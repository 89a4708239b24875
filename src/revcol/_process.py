"""Process-wide state that revcol's applications borrow: environment variables and logging settings.

The ``revcol`` command and the demo run Ultralytics, which sets environment variables while it trains (its
augmentation's, its seeding's) and may reconfigure loggers; called from Python, they must leave the caller's
process as they found it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["process_state_kept"]


@contextlib.contextmanager
def environment_kept(**values: str) -> Iterator[None]:
    """The block runs with ``values`` set in ``os.environ``; afterwards ``os.environ`` is exactly as before."""
    before = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        for name in [name for name in os.environ if name not in before]:
            del os.environ[name]
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def _loggers() -> list[logging.Logger]:
    known = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger(), *(logger for logger in known if isinstance(logger, logging.Logger))]


@contextlib.contextmanager
def loggers_kept() -> Iterator[None]:
    """Afterwards every logger that existed before has its level, handlers, ``propagate`` and ``disabled`` back,
    and ``logging.disable`` its level. Loggers made inside the block (by modules imported there) are left as made."""
    before = [(logger, logger.level, list(logger.handlers), logger.propagate, logger.disabled) for logger in _loggers()]
    disabled_below = logging.Logger.manager.disable
    try:
        yield
    finally:
        logging.disable(disabled_below)
        for logger, level, handlers, propagate, disabled in before:
            if logger.handlers != handlers:
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                for handler in handlers:
                    logger.addHandler(handler)
            if logger.level != level:
                logger.setLevel(level)  # through setLevel: it clears the loggers' cached isEnabledFor answers
            logger.propagate, logger.disabled = propagate, disabled


@contextlib.contextmanager
def process_state_kept(**environ: str) -> Iterator[None]:
    """The block runs with ``environ`` set; afterwards ``os.environ`` and the loggers are as they were before it."""
    with loggers_kept(), environment_kept(**environ):
        yield
