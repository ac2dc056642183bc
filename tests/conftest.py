"""Session setup and shared fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Set up the session: no forking Trainers, one intra-op thread (small tensors, a 2-core machine)."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    torch.set_num_threads(1)


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
