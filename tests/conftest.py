"""Shared fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def nodecay_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the library's log records (its logger may not propagate to the root)."""
    logger = logging.getLogger("lightning_nodecay")
    attach = not logger.propagate  # it propagates (to caplog's root handler) unless it set up its own handler
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning_nodecay")
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)
