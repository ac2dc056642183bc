"""The one place that picks the Lightning namespace(s).

``pytorch_lightning`` is required. When the unified ``lightning`` package is installed too, the
callbacks of this library inherit from both namespaces' ``Callback`` classes, so one class (one
implementation) is accepted by a ``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer``.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytorch_lightning


def _namespaces() -> tuple[ModuleType, ...]:
    found: list[ModuleType] = [pytorch_lightning]
    if importlib.util.find_spec("lightning") is not None:
        try:
            import lightning.pytorch
        except ImportError:  # a broken optional install must not break the primary namespace
            pass
        else:
            found.append(lightning.pytorch)
    return tuple(found)


NAMESPACES = _namespaces()


def bases(name: str) -> tuple[type, ...]:
    """The class ``name`` (e.g. ``"callbacks.Callback"``) from every installed namespace.

    Example:
        >>> import pytorch_lightning
        >>> pytorch_lightning.Callback in bases("callbacks.Callback")
        True
    """
    module_path, _, attribute = name.rpartition(".")
    found = []
    for namespace in NAMESPACES:
        module = importlib.import_module(f"{namespace.__name__}.{module_path}")
        found.append(getattr(module, attribute))
    return tuple(found)
