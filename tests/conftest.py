"""Shared fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def nodecay_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the library's log records (its logger may not propagate to the root)."""
    logger = logging.getLogger("lightning_nodecay")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning_nodecay")
    yield caplog
    logger.removeHandler(caplog.handler)
