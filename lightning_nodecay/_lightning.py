"""The one place that imports Lightning, and picks the namespace(s).

``pytorch_lightning`` is required. When the unified ``lightning`` package is installed too, the callback
bases here inherit from both namespaces' classes, so one class (one implementation) is accepted by a
``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer``. Type checkers see the
``pytorch_lightning`` classes.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Any

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


def _merged(path: str) -> type:
    """The class at ``path`` (e.g. ``"callbacks.Callback"``) of every namespace, merged into one class.

    Examples:
        >>> issubclass(_merged("callbacks.Callback"), pytorch_lightning.Callback)
        True
    """
    module_path, _, attribute = path.rpartition(".")
    found = tuple(
        getattr(importlib.import_module(f"{namespace.__name__}.{module_path}"), attribute) for namespace in NAMESPACES
    )
    return found[0] if len(found) == 1 else type(attribute, found, {"__module__": __name__})


def logged_step(trainer: Any) -> int | None:
    """The step this batch's metrics are logged under, or ``None`` when the batch is not a logging step.

    Lightning logs ``self.log`` values, and ``LearningRateMonitor`` its learning rates, under the number of
    batches that stepped the optimizers so far (not ``global_step``, which counts every optimizer's steps
    under manual optimization), on the batches where that number plus one is a multiple of
    ``log_every_n_steps``. The count is only reachable as the fit loop's ``_batches_that_stepped``.
    """
    every: int = trainer.log_every_n_steps
    step: int = trainer.fit_loop.epoch_loop._batches_that_stepped
    return step if every and (step + 1) % every == 0 else None


if TYPE_CHECKING:
    from pytorch_lightning.callbacks import BackboneFinetuning, BaseFinetuning, Callback
else:
    Callback = _merged("callbacks.Callback")
    BaseFinetuning = _merged("callbacks.BaseFinetuning")
    BackboneFinetuning = _merged("callbacks.BackboneFinetuning")

__all__ = ["NAMESPACES", "BackboneFinetuning", "BaseFinetuning", "Callback", "logged_step"]
