"""``WeightNormMonitor``: log the norm of every param group's weights, to see the exclusions working.

Thin Lightning glue over :func:`lightning_nodecay.group_norms`. The class inherits ``Callback`` from
every installed Lightning namespace (see ``_lightning.py``), so one implementation is accepted by a
``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from typing_extensions import override

from lightning_nodecay._lightning import Callback
from lightning_nodecay._naming import group_name
from lightning_nodecay._schema import HOOK_WEIGHT_DECAY, MASK_SHARE, PARAMS, WEIGHT_DECAY
from lightning_nodecay.norms import GroupNorms, check_norm_type, fsdp_shard_group, group_norms

if TYPE_CHECKING:
    import pytorch_lightning as pl


class WeightNormMonitor(Callback):
    """Log the norm of each param group's weights (and optionally gradients, RMS, weight decay) while training.

    With weight decay working as intended, the ``decay`` group's norm is pulled down steadily while the
    ``no_decay`` group (biases, norm scales, PReLU slopes, ...) is not pulled toward zero.

    Keys, for every param group of every optimizer (group name from its ``"name"`` key, else ``pg1``, ``pg2``,
    ... as ``LearningRateMonitor`` names them; with several optimizers the group name is prefixed by the
    optimizer class, ``SGD/decay``, ``SGD-1/pg1``, again as ``LearningRateMonitor`` does):

    - ``weight_{norm_type}_norm/{group}`` and ``weight_{norm_type}_norm_total`` (all groups together), e.g.
      ``weight_2.0_norm/decay``, ``weight_inf_norm/no_decay``;
    - with ``log_grad_norm``: ``grad_{norm_type}_norm/{group}``, the gradient norm before the optimizer step
      (after unscaling under mixed precision), over the parameters that have a gradient;
    - with ``log_rms``: ``weight_rms/{group}``, the 2-norm over the square root of the number of elements,
      so that groups of different sizes compare;
    - with ``log_weight_decay``: ``weight_decay/{group}``, the group's effective weight decay (its
      ``weight_decay``, plus the ``hook_weight_decay`` that per-element masks apply in its place), and
      ``weight_decay_mask_share/{group}`` for groups that carry that key.

    Values are the weights after the optimizer step, logged at the Trainer's ``log_every_n_steps`` cadence on
    the batches that step the optimizer (so gradient accumulation is respected), under the same step as
    ``self.log`` values and ``LearningRateMonitor``, to every logger of the Trainer. Nothing is computed on
    other batches. Norms are computed by :func:`~lightning_nodecay.group_norms`: multi-tensor kernels,
    float32 accumulation, and under FSDP1 or FSDP2 / DTensor ONE collective per logged step on every rank
    (none under DDP or on one device). ``DeepSpeedStrategy`` is not supported yet (a clear error).

    Args:
        norm_type: the p of the p-norm: any positive number, or ``"inf"`` for the largest absolute value.
        log_grad_norm: also log each group's gradient norm before the optimizer step.
        log_rms: also log each group's root mean square; needs ``norm_type=2``.
        log_weight_decay: also log each group's ``weight_decay`` (and ``weight_decay_mask_share``).

    Raises:
        ValueError: on a bad ``norm_type``, ``log_rms`` with another norm, a Trainer without logger, or
            param groups of one optimizer sharing a name.

    Example:
        >>> import pytorch_lightning as pl
        >>> monitor = WeightNormMonitor(norm_type=2, log_rms=True)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=pl.loggers.CSVLogger("logs"), log_every_n_steps=50)
        >>> WeightNormMonitor(norm_type=0)
        Traceback (most recent call last):
        ...
        ValueError: `norm_type` must be a positive number or 'inf' (infinity norm). Got 0.
    """

    def __init__(
        self,
        norm_type: float | str = 2.0,
        log_grad_norm: bool = False,
        log_rms: bool = False,
        log_weight_decay: bool = False,
    ) -> None:
        self.norm_type = check_norm_type(norm_type)
        if log_rms and self.norm_type != 2:
            raise ValueError(
                f"`log_rms=True` needs `norm_type=2` (the RMS is the 2-norm over the square root of the number of"
                f" elements); got `norm_type={norm_type!r}`. Add a second `WeightNormMonitor(log_rms=True)` for it."
            )
        self.log_grad_norm = log_grad_norm
        self.log_rms = log_rms
        self.log_weight_decay = log_weight_decay
        self._shard_group: Any = None
        self._stepped = False
        self._grad_metrics: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before training when there is nowhere to log."""
        if stage == "fit" and not trainer.loggers:
            raise ValueError(
                "Cannot use `WeightNormMonitor` callback with a `Trainer` that has no logger. Pass one, e.g."
                " `Trainer(logger=CSVLogger('logs'))`, or remove the callback."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find how the parameters are sharded and check the group names, before the first step."""
        if getattr(trainer.strategy, "strategy_name", None) == "deepspeed":
            raise ValueError(
                "`WeightNormMonitor` does not support `DeepSpeedStrategy` yet: its optimizer's param groups hold"
                " flat partitions, not the model's parameters. Compute norms of the ZeRO-3 parameters with"
                " `lightning_nodecay.group_norms` instead, or remove the callback."
            )
        model = trainer.strategy.model
        self._shard_group = fsdp_shard_group(pl_module if model is None else model)
        _logged_names(trainer.optimizers)
        self._stepped, self._grad_metrics = False, {}  # nothing left over from an interrupted fit

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Note that the optimizer steps; on logging steps, take the gradient norms if asked."""
        self._stepped = True
        if not self.log_grad_norm or _logged_step(trainer) is None:
            return
        index = next(i for i, candidate in enumerate(trainer.optimizers) if candidate is optimizer)
        names = _logged_names(trainer.optimizers)[index]
        grads = [[p.grad for p in group[PARAMS] if p.grad is not None] for group in optimizer.param_groups]
        norms = self._norms(grads).norms.tolist()
        self._grad_metrics.update(zip((f"grad_{self.norm_type}_norm/{name}" for name in names), norms, strict=True))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """On logging steps where the optimizer stepped, log the norms of the updated weights."""
        if not self._stepped:
            return
        self._stepped = False
        step = _logged_step(trainer)
        if step is None:
            return
        metrics, self._grad_metrics = self._grad_metrics, {}
        metrics.update(self._weight_metrics(trainer.optimizers))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _weight_metrics(self, optimizers: list[Optimizer]) -> dict[str, float]:
        names = [name for per_optimizer in _logged_names(optimizers) for name in per_optimizer]
        groups = [group for optimizer in optimizers for group in optimizer.param_groups]
        result = self._norms([group[PARAMS] for group in groups])
        prefix = f"weight_{self.norm_type}_norm"
        keys = [f"{prefix}/{name}" for name in names] + [f"{prefix}_total"]
        values = [result.norms, result.total.reshape(1)]
        if self.log_rms and result.numels is not None:
            keys += [f"weight_rms/{name}" for name in names]
            values.append(result.norms / result.numels.clamp(min=1).sqrt())
        metrics = dict(zip(keys, torch.cat(values).tolist(), strict=True))  # one device sync
        if self.log_weight_decay:
            metrics.update(_weight_decay_metrics(names, groups))
        return metrics

    def _norms(self, groups: list[Any]) -> GroupNorms:
        return group_norms(
            groups, self.norm_type, sharded=self._shard_group is not None, process_group=self._shard_group
        )


def _logged_step(trainer: pl.Trainer) -> int | None:
    """The step this batch's metrics are logged under, or ``None`` when the batch is not a logging step.

    Lightning logs ``self.log`` values, and ``LearningRateMonitor`` its learning rates, under the number of
    batches that stepped the optimizers so far (not ``global_step``, which counts every optimizer's steps
    under manual optimization), on the batches where that number plus one is a multiple of
    ``log_every_n_steps``. The count is only reachable as the fit loop's ``_batches_that_stepped``.
    """
    every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set in the Trainer's __init__
    step: int = trainer.fit_loop.epoch_loop._batches_that_stepped
    return step if every and (step + 1) % every == 0 else None


def _logged_names(optimizers: list[Optimizer]) -> list[list[str]]:
    """The name of every param group, per optimizer, as ``LearningRateMonitor`` builds them.

    A group's ``"name"``, else ``pg{i}`` counting from 1 (``_naming.group_name``); with
    several optimizers, prefixed by the optimizer class and a counter for repeated classes: ``SGD/decay``,
    ``SGD-1/pg1``, ``Adam/pg1``.
    """
    seen: Counter[str] = Counter()
    names = []
    for optimizer in optimizers:
        group_names = [group_name(group, i) for i, group in enumerate(optimizer.param_groups)]
        optimizer_name = type(optimizer).__name__
        repeated = sorted({name for name in group_names if group_names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"`WeightNormMonitor` cannot tell apart the param groups of `{optimizer_name}` named"
                f" {', '.join(f'`{name}`' for name in repeated)}: give each group of an optimizer its own `name`."
            )
        if len(optimizers) > 1:
            seen[optimizer_name] += 1
            prefix = optimizer_name if seen[optimizer_name] == 1 else f"{optimizer_name}-{seen[optimizer_name] - 1}"
            group_names = [f"{prefix}/{name}" for name in group_names]
        names.append(group_names)
    return names


def _weight_decay_metrics(names: list[str], groups: list[dict[str, Any]]) -> dict[str, float]:
    """Each group's effective decay, and the share of its elements under per-element masks.

    The effective decay is the optimizer's ``weight_decay`` plus the ``hook_weight_decay`` that per-element
    masks move out of the optimizer (which then sees 0).
    """
    metrics = {}
    for name, group in zip(names, groups, strict=True):
        if WEIGHT_DECAY in group or HOOK_WEIGHT_DECAY in group:
            decay = float(group.get(WEIGHT_DECAY, 0.0)) + float(group.get(HOOK_WEIGHT_DECAY, 0.0))
            metrics[f"weight_decay/{name}"] = decay
        if MASK_SHARE in group:
            metrics[f"weight_decay_mask_share/{name}"] = float(group[MASK_SHARE])
    return metrics
