"""A ``caplog`` fixture that sees the package logger, which does not propagate once set up."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest

from orchestratord import logs


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the package logger at debug level; import it into a test module to use it."""
    logger = logging.getLogger(logs.ROOT)
    old_propagate, logger.propagate = logger.propagate, False
    logger.addHandler(caplog.handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old)
        logger.propagate = old_propagate
