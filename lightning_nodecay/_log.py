"""The library's logger, set up the way Lightning sets up its own: INFO, to stderr when the
application configured no logging."""

from __future__ import annotations

import logging

log = logging.getLogger("lightning_nodecay")
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False
