"""The process-wide state revcol's applications borrow and give back (``revcol._process``): environment variables
and logging settings. The ``revcol`` command and the demo leaving them as found: ``test_hooks.py``."""

from __future__ import annotations

import logging
import os

import pytest

from revcol._process import environment_kept, loggers_kept, process_state_kept


def test_the_environment_is_given_back_whatever_the_block_did(monkeypatch):
    monkeypatch.setenv("REVCOL_TEST_KEPT", "before")
    monkeypatch.setenv("REVCOL_TEST_REMOVED", "before")
    monkeypatch.delenv("REVCOL_TEST_ADDED", raising=False)
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="inside"), environment_kept(REVCOL_TEST_SET="block"):
        assert os.environ["REVCOL_TEST_SET"] == "block"
        os.environ["REVCOL_TEST_KEPT"] = "changed"
        os.environ["REVCOL_TEST_ADDED"] = "added"
        del os.environ["REVCOL_TEST_REMOVED"]
        raise RuntimeError("inside")
    assert dict(os.environ) == before


def test_every_logger_is_given_back_and_new_ones_are_left_as_made():
    logger, root = logging.getLogger("revcol.test.process"), logging.getLogger()
    handler = logging.NullHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    before = (logger.level, list(logger.handlers), logger.propagate, logger.disabled, list(root.handlers))
    disabled_below = logging.root.manager.disable
    try:
        with loggers_kept():
            logger.setLevel(logging.ERROR)
            assert not logger.isEnabledFor(logging.INFO)  # cached by the logger until a level is set
            logger.removeHandler(handler)
            logger.addHandler(logging.StreamHandler())
            logger.propagate, logger.disabled = False, True
            root.addHandler(logging.NullHandler())
            logging.disable(logging.CRITICAL)
            made = logging.getLogger("revcol.test.process.made")
            made.setLevel(logging.WARNING)
        assert (logger.level, logger.handlers, logger.propagate, logger.disabled, root.handlers) == before
        assert logger.handlers[0] is handler and logging.root.manager.disable == disabled_below
        assert logger.isEnabledFor(logging.INFO)  # not the answer cached inside the block
        assert made.level == logging.WARNING  # made inside the block: as its maker set it
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logging.disable(disabled_below)


def test_the_process_state_block_sets_its_variables_and_gives_everything_back(monkeypatch):
    monkeypatch.delenv("REVCOL_TEST_OFFLINE", raising=False)
    logger = logging.getLogger("revcol.test.process.state")
    with process_state_kept(REVCOL_TEST_OFFLINE="true"):
        assert os.environ["REVCOL_TEST_OFFLINE"] == "true"
        logger.setLevel(logging.ERROR)
    assert "REVCOL_TEST_OFFLINE" not in os.environ and logger.level == logging.NOTSET
