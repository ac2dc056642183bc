"""The library's logger, set up the way Lightning sets up its own: INFO, to stderr when the
application configured no logging; and how its messages list parameter names."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger("lightning_nodecay")
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    log.addHandler(logging.StreamHandler())
    log.propagate = False


def listed(names: Sequence[str], quoted: bool = False, shown: int = 4) -> str:
    """The first ``shown`` names, comma-separated (in backticks if ``quoted``), then ``...`` if there are more."""
    items = [f"`{name}`" if quoted else name for name in names[:shown]]
    return ", ".join(items + ["..."] * (len(names) > shown))
