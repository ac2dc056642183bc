"""``WeightNormMonitor``: log the norm of every param group's weights, to see the exclusions working.

Thin Lightning glue over :func:`lightning_nodecay.group_norms`. The class inherits ``Callback`` from
every installed Lightning namespace (see ``_lightning.py``), so one implementation is accepted by a
``pytorch_lightning.Trainer`` and a ``lightning.pytorch.Trainer``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_nodecay._lightning import Callback, logged_step
from lightning_nodecay._naming import logged_names
from lightning_nodecay._schema import HOOK_WEIGHT_DECAY, MASK_SHARE, PARAMS, WEIGHT_DECAY
from lightning_nodecay._shards import fsdp_shard_group
from lightning_nodecay.hook import WeightDecayHook
from lightning_nodecay.norms import (
    NormPlan,
    NormStats,
    PlanCache,
    check_norm_type,
    reduce_stats,
    roots,
)
from lightning_nodecay.schedule import WeightDecayScheduler

if TYPE_CHECKING:
    import pytorch_lightning as pl


class WeightNormMonitor(Callback):
    """Log the norm of each param group's weights (and optionally gradients, RMS, updates, weight decay) while training.

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
    - with ``log_update_ratio``: ``update_ratio/{group}``, ``||w_after - w_before|| / ||w_after||`` in the
      ``norm_type`` norm: how far the batch's optimizer step moved the group relative to its size (around
      ``1e-3`` is the usual rule of thumb for the 2-norm; 0 for a group that did not move, as in a step
      skipped by the AMP grad scaler; ``inf`` for one moved to all zeros). The weights this rank holds are
      copied in ``on_before_optimizer_step`` (its first call of the batch, before a closure such as LBFGS's
      moves them) on logging steps only, and the copy is freed as soon as the ratio is computed: memory for
      one copy of the weights during those steps. An optimizer that did not step in the batch has no ratio;
    - ``distance_to_reference/{group}``, ``||w - w0||`` in the ``norm_type`` norm, for every group decayed toward a
      reference (``weight_decay_toward``, L2-SP), ``w0`` being the references the weight-decay hook holds: how far
      fine-tuning has moved the group from its starting point;
    - with ``log_weight_decay``: ``weight_decay/{group}``, the group's effective weight decay (its
      ``weight_decay``, plus the ``hook_weight_decay`` that per-element masks apply in its place), and
      ``weight_decay_mask_share/{group}`` for groups that carry that key.

    Values are the weights after the optimizer step, logged at the Trainer's ``log_every_n_steps`` cadence on
    the batches that step the optimizer (so gradient accumulation is respected), under the same step as
    ``self.log`` values and ``LearningRateMonitor``, to every logger of the Trainer. Nothing is computed on
    other batches. Norms are computed as :func:`~lightning_nodecay.group_norms` computes them: multi-tensor
    kernels, float32 accumulation, and under FSDP1 or FSDP2 / DTensor ONE collective per logged step on every
    rank for everything the step logs (weights, gradients, updates; none under DDP or on one device).
    ``DeepSpeedStrategy`` is not supported yet (a clear error). The layout of the computation (a
    :class:`~lightning_nodecay.norms.NormPlan` per optimizer) is kept between logged steps and rebuilt only
    when a param group changes: another group, another tensor in it, or new storage behind one.

    Args:
        norm_type: the p of the p-norm: any positive number, or ``"inf"`` for the largest absolute value.
        log_grad_norm: also log each group's gradient norm before the optimizer step.
        log_rms: also log each group's root mean square; needs ``norm_type=2``.
        log_update_ratio: also log each group's update-to-weight ratio.
        log_weight_decay: also log each group's ``weight_decay`` (and ``weight_decay_mask_share``).

    Raises:
        ValueError: on a bad ``norm_type``, ``log_rms`` with another norm, a Trainer without logger, or
            param groups of one optimizer sharing a name.

    Examples:
        >>> import pytorch_lightning as pl
        >>> monitor = WeightNormMonitor(norm_type=2, log_rms=True, log_update_ratio=True)
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
        log_update_ratio: bool = False,
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
        self.log_update_ratio = log_update_ratio
        self._shard_group: Any = None
        self._scheduler_logs_decay = False
        self._reset()

    def _reset(self) -> None:
        """Drop everything kept across hooks: the plans, and what a logging step has gathered so far."""
        self._plans = PlanCache(sharded=self._shard_group is not None, process_group=self._shard_group)
        self._stepped = False
        self._grads: dict[int, NormStats] = {}  # per optimizer index, on a logging step
        self._snapshots: dict[int, _Snapshot] = {}  # idem

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
        logged_names(trainer.optimizers, "WeightNormMonitor")
        # the scheduler logs `weight_decay/{group}` itself, with the same values: each key is logged once
        self._scheduler_logs_decay = any(
            isinstance(c, WeightDecayScheduler) and c.log_weight_decay
            for c in trainer.callbacks  # type: ignore[attr-defined]  # a Trainer property
        )
        self._reset()  # nothing left over from another fit

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Release the plans, which hold the model's parameters, when the fit ends."""
        self._reset()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Note that the optimizer steps; on logging steps, take the gradient norms and the weights, if asked."""
        self._stepped = True
        if not (self.log_grad_norm or self.log_update_ratio) or logged_step(trainer) is None:
            return
        index = next(i for i, candidate in enumerate(trainer.optimizers) if candidate is optimizer)
        if self.log_grad_norm:
            grads = [[p.grad for p in group[PARAMS] if p.grad is not None] for group in optimizer.param_groups]
            plan = NormPlan(grads, sharded=self._shard_group is not None, process_group=self._shard_group)
            self._grads[index] = plan.local(self.norm_type)
        if self.log_update_ratio and index not in self._snapshots:  # a closure run again (LBFGS): keep the first
            plan = self._plan(index, optimizer)
            self._snapshots[index] = _Snapshot(plan, _layout(optimizer), plan.snapshot())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """On logging steps where the optimizer stepped, log the norms of the updated weights."""
        if not self._stepped:
            return
        self._stepped = False
        grads, snapshots = self._grads, self._snapshots
        self._grads, self._snapshots = {}, {}
        step = logged_step(trainer)
        if step is None:
            return
        metrics = self._metrics(trainer.optimizers, grads, snapshots)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _metrics(
        self,
        optimizers: list[Optimizer],
        grads: dict[int, NormStats],
        snapshots: dict[int, _Snapshot],
    ) -> dict[str, float]:
        """Every metric of a logging step, from ONE collective when sharded and ONE device sync."""
        p = self.norm_type
        names = logged_names(optimizers, "WeightNormMonitor")
        flat_names = [name for per_optimizer in names for name in per_optimizer]
        weights, updates, updated = self._local_weights_and_updates(optimizers, snapshots)
        distances, far = self._local_distances(optimizers)
        parts = [NormStats.join(weights), *grads.values(), *(NormStats.join(s) for s in (updates, distances) if s)]
        host = self._fetch(parts)
        norms, total = roots(_take(host, len(flat_names)), p)
        metrics = {f"weight_{p}_norm/{name}": norm for name, norm in zip(flat_names, norms, strict=True)}
        metrics[f"weight_{p}_norm_total"] = total
        for index in grads:
            grad_norms, _ = roots(_take(host, len(names[index])), p)
            metrics.update(zip([f"grad_{p}_norm/{name}" for name in names[index]], grad_norms, strict=True))
        moved, _ = roots(_take(host, len(updated)), p)
        metrics.update(
            (f"update_ratio/{flat_names[r]}", _ratio(m, norms[r])) for r, m in zip(updated, moved, strict=True)
        )
        offsets, _ = roots(_take(host, len(far)), p)
        metrics.update((f"distance_to_reference/{flat_names[r]}", d) for r, d in zip(far, offsets, strict=True))
        if self.log_rms:
            metrics.update(
                (f"weight_rms/{name}", norm / math.sqrt(max(round(numel), 1)))
                for name, norm, numel in zip(flat_names, norms, host, strict=True)
            )
        if self.log_weight_decay:
            groups = [g for o in optimizers for g in o.param_groups]
            metrics.update(_weight_decay_metrics(flat_names, groups, with_decay=not self._scheduler_logs_decay))
        return metrics

    def _fetch(self, parts: list[NormStats]) -> Iterator[float]:
        """Every part's statistics as floats: ONE collective across ranks, ONE device sync.

        The weights' element counts follow when the RMS is logged. The few per-group floats are finished in
        Python: each tensor op would cost tens of microseconds here, its code out of cache after a training step.
        """
        reduced = reduce_stats(parts, self.norm_type, reduce=self._plans.reduce, process_group=self._shard_group)
        tensors = [part.stats for part in reduced] + ([reduced[0].numels] if self.log_rms else [])
        return iter((tensors[0] if len(tensors) == 1 else torch.cat(tensors)).tolist())

    def _local_weights_and_updates(
        self, optimizers: list[Optimizer], snapshots: dict[int, _Snapshot]
    ) -> tuple[list[NormStats], list[NormStats], list[int]]:
        """This rank's statistics of every optimizer's weights, and of the updates of those with a snapshot.

        Also returns the rows of the updated groups among all optimizers' groups, in the order of the updates.
        """
        weights: list[NormStats] = []
        updates: list[NormStats] = []
        updated: list[int] = []
        row = 0
        for index, optimizer in enumerate(optimizers):
            taken = snapshots.get(index)
            if taken is not None and taken.layout == _layout(optimizer):  # the groups are those of the snapshot
                weight, update = taken.plan.local_with_update(self.norm_type, taken.copies)
                updates.append(update)
                updated += range(row, row + taken.plan.size)
            else:
                weight = self._plan(index, optimizer).local(self.norm_type)
            weights.append(weight)
            row += len(optimizer.param_groups)
        return weights, updates, updated

    def _local_distances(self, optimizers: list[Optimizer]) -> tuple[list[NormStats], list[int]]:
        """This rank's statistics of ``w - w0`` for every group decayed toward a reference, and those groups' rows."""
        distances: list[NormStats] = []
        rows: list[int] = []
        row = 0
        for index, optimizer in enumerate(optimizers):
            hook = WeightDecayHook.of(optimizer)
            referenced = hook.group_references() if hook is not None else {}
            if referenced:
                positions = sorted(referenced)
                weights = self._plans.plan(-2 * index - 1, [referenced[i][0] for i in positions])
                references = self._plans.plan(-2 * index - 2, [referenced[i][1] for i in positions])
                distances.append(weights.local_distance(self.norm_type, references))
                rows += [row + i for i in positions]
            row += len(optimizer.param_groups)
        return distances, rows

    def _plan(self, index: int, optimizer: Optimizer) -> NormPlan:
        """The plan of the optimizer's groups, kept while they hold the same tensors."""
        return self._plans.plan(index, [group[PARAMS] for group in optimizer.param_groups])


class _Snapshot(NamedTuple):
    """An optimizer's weights taken just before its step: the plan, the groups' layout then, the copies."""

    plan: NormPlan
    layout: tuple[tuple[int, int], ...]
    copies: list[list[Tensor]]


def _layout(optimizer: Optimizer) -> tuple[tuple[int, int], ...]:
    """The id and length of each group's list of parameters.

    Enough to tell that the groups are still those of a snapshot taken in the same step, without comparing
    every tensor again as :class:`~lightning_nodecay.norms.PlanCache` does.
    """
    return tuple((id(group[PARAMS]), len(group[PARAMS])) for group in optimizer.param_groups)


def _take(values: Iterator[float], count: int) -> list[float]:
    return list(itertools.islice(values, count))


def _ratio(change: float, size: float) -> float:
    """The update-to-weight ratio: 0 for no change, infinite for a change to all-zero weights."""
    if not change:
        return 0.0
    return change / size if size else math.inf


def _weight_decay_metrics(names: list[str], groups: list[dict[str, Any]], with_decay: bool) -> dict[str, float]:
    """Each group's effective decay (when ``with_decay``), and the share of its elements under masks.

    The effective decay is the optimizer's ``weight_decay`` plus the ``hook_weight_decay`` that per-element
    masks move out of the optimizer (which then sees 0).
    """
    metrics: dict[str, float] = {}
    for name, group in zip(names, groups, strict=True):
        if with_decay and (WEIGHT_DECAY in group or HOOK_WEIGHT_DECAY in group):
            metrics[f"weight_decay/{name}"] = float(group.get(WEIGHT_DECAY, 0.0)) + float(
                group.get(HOOK_WEIGHT_DECAY, 0.0)
            )
        if MASK_SHARE in group:
            metrics[f"weight_decay_mask_share/{name}"] = float(group[MASK_SHARE])
    return metrics
