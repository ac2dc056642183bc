"""``WeightDecayScheduler``: the base weight decay over training, with every exclusion and multiplier kept.

Every param group gets ``base(t) x its decided multiplier``: excluded groups stay exactly 0, multiplier groups
scale along, masked and L1 groups through the step hook's ``hook_weight_decay`` (their ``weight_decay`` stays 0),
and groups added later by the fine-tuning callbacks are included. The schedule therefore keeps the weight-decay
invariant by construction: all decayed groups share one base at every step.

A Lightning callback, and a plain object for Fabric or a raw loop (``step()``, ``state_dict()``,
``load_state_dict()``). One schedule for all optimizers of a fit: each optimizer counts its own steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch.optim import Optimizer

from lightning_nodecay._invariant import current_base, effective_decay
from lightning_nodecay._lightning import Callback, logged_step
from lightning_nodecay._naming import group_name
from lightning_nodecay._schedules import Schedule, as_schedule, constant, cosine, linear
from lightning_nodecay._schema import HOOK_WEIGHT_DECAY, WEIGHT_DECAY, WEIGHT_DECAY_MULTIPLIER
from lightning_nodecay._semantics import unwrap_optimizer

if TYPE_CHECKING:
    import pytorch_lightning as pl

ScheduleName = Literal["cosine", "linear", "constant"]
Interval = Literal["step", "epoch"]


class WeightDecayScheduler(Callback):
    """Set the base weight decay over training; every group gets base(t) x its decided multiplier.

    Built in: ``"cosine"`` (DINO's ``cosine_scheduler``, exactly), ``"linear"`` (Megatron's ``start_wd`` ->
    ``end_wd``) and ``"constant"``, each after an optional linear warm-up from ``warmup_start``; or any callable
    ``(step) -> base weight decay``. With ``interval="step"`` a step is an optimizer step (gradient accumulation
    counts optimizer steps, not batches) and the value is set right before it; with ``"epoch"`` a step is an
    epoch, set at its start.

    The effective decay of each group is logged as ``weight_decay/{group}`` (the key of
    ``WeightNormMonitor(log_weight_decay=True)``, which then leaves it to the scheduler) at the Trainer's
    ``log_every_n_steps``. Lightning's ``LearningRateMonitor(log_weight_decay=True)`` reads ``weight_decay``
    only, so it shows 0 for masked and L1 groups, whose decay the hook applies: read ``weight_decay/{group}``.

    Its state (the steps taken) is saved in checkpoints; a resumed fit continues the schedule where it stopped.

    Args:
        schedule: ``"cosine"``, ``"linear"``, ``"constant"``, or a callable ``(step) -> base weight decay``.
        start: the base weight decay after the warm-up; default: the optimizer's base weight decay.
        end: the final base weight decay (``"cosine"``, ``"linear"``).
        total_steps: the length of the schedule; default: the fit's optimizer steps
            (``trainer.estimated_stepping_batches``) or epochs (``trainer.max_epochs``).
        warmup_steps: the length of the linear warm-up (0: none).
        warmup_start: the base weight decay the warm-up starts from.
        interval: ``"step"`` (each optimizer step) or ``"epoch"``.
        optimizers: the optimizers to schedule, for use without a Trainer (a Trainer's are taken at fit start).
        log_weight_decay: log each group's effective weight decay.

    Raises:
        ValueError: an unknown ``schedule`` or ``interval``, a missing ``end``, or a bad value (named).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay import param_groups
        >>> net = nn.Linear(2, 2)
        >>> optimizer = torch.optim.AdamW(param_groups(net), lr=0.1, weight_decay=0.04)
        >>> scheduler = WeightDecayScheduler("linear", end=0.4, total_steps=2, optimizers=[optimizer])
        >>> for _ in range(3):
        ...     scheduler.step()
        ...     print([round(g["weight_decay"], 2) for g in optimizer.param_groups])
        [0.04, 0.0]
        [0.22, 0.0]
        [0.4, 0.0]
    """

    def __init__(
        self,
        schedule: ScheduleName | Callable[[int], float] = "cosine",
        *,
        start: float | None = None,
        end: float | None = None,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        warmup_start: float = 0.0,
        interval: Interval = "step",
        optimizers: Sequence[Optimizer] = (),
        log_weight_decay: bool = True,
    ) -> None:
        if interval not in get_args(Interval):
            raise ValueError(f"`interval` must be 'step' or 'epoch'; got {interval!r}.")
        if not callable(schedule) and schedule not in get_args(ScheduleName):
            raise ValueError(
                f"`schedule` must be 'cosine', 'linear', 'constant' or a callable `(step) -> weight decay`; got"
                f" {schedule!r}."
            )
        if schedule in ("cosine", "linear") and end is None:
            raise ValueError(f"`schedule={schedule!r}` needs `end`, the final base weight decay.")
        self.schedule, self.start, self.end = schedule, start, end
        self.total_steps, self.warmup_steps, self.warmup_start = total_steps, warmup_steps, warmup_start
        self.interval, self.log_weight_decay = interval, log_weight_decay
        self._optimizers = [unwrap_optimizer(o) for o in optimizers]
        self._function: Schedule | None = None
        self._steps: list[int] = [0] * len(self._optimizers)
        self._multipliers: list[dict[int, float]] = [{} for _ in self._optimizers]

    @property
    def state_key(self) -> str:
        """Tell apart several schedulers in one checkpoint."""
        return self._generate_state_key(schedule=str(self.schedule), interval=self.interval, end=self.end)

    def step(self, optimizer_index: int | None = None) -> None:
        """Set the base weight decay of the next step, then count it (every optimizer, or one of them)."""
        indices = range(len(self._optimizers)) if optimizer_index is None else [optimizer_index]
        for index in indices:
            self._apply(index, self._steps[index])
            self._steps[index] += 1

    def value(self, step: int) -> float:
        """The base weight decay at ``step``."""
        if self._function is None:
            self._function = self._build(self.start if self.start is not None else self._default_start())
        return self._function(step)

    def state_dict(self) -> dict[str, Any]:
        """The steps each optimizer took, for checkpoints."""
        return {"steps": list(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the schedule from a checkpoint's state."""
        self._steps = list(state_dict["steps"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Know the fit's length before the schedule is built."""
        if stage == "fit" and self.total_steps is None:
            self._fit_length = trainer.estimated_stepping_batches if self.interval == "step" else trainer.max_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the Trainer's optimizers (after a resume restored them) and set the value of the coming step."""
        steps = self._steps
        self._optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        self._steps = steps if len(steps) == len(self._optimizers) else [0] * len(self._optimizers)
        self._multipliers = [{} for _ in self._optimizers]
        self._function = None
        for index in range(len(self._optimizers)):
            self._apply(index, self._steps[index])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Set the base weight decay of this optimizer step."""
        if self.interval == "step":
            index = self._optimizers.index(unwrap_optimizer(optimizer))
            self._apply(index, self._steps[index])
            self._steps[index] += 1
            self._log(trainer, index)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the base weight decay of this epoch."""
        if self.interval == "epoch":
            for index in range(len(self._optimizers)):
                self._steps[index] = trainer.current_epoch
                self._apply(index, trainer.current_epoch)
                self._log(trainer, index)

    def _apply(self, index: int, step: int) -> None:
        """Give every group of optimizer ``index`` base(``step``) x its multiplier."""
        optimizer = self._optimizers[index]
        base = self.value(step)
        known = self._multipliers[index]
        for group in optimizer.param_groups:
            multiplier = group.get(WEIGHT_DECAY_MULTIPLIER)
            if multiplier is None:  # a group the rules did not build: its ratio to the base when first seen
                multiplier = known.setdefault(id(group), _ratio(group, optimizer))
            group[HOOK_WEIGHT_DECAY if HOOK_WEIGHT_DECAY in group else WEIGHT_DECAY] = base * multiplier

    def _log(self, trainer: pl.Trainer, index: int) -> None:
        step = logged_step(trainer)
        if not self.log_weight_decay or not trainer.loggers or step is None:
            return
        optimizer = self._optimizers[index]
        prefix = f"{type(optimizer).__name__}-{index}/" if len(self._optimizers) > 1 else ""
        metrics = {
            f"weight_decay/{prefix}{group_name(group, i)}": effective_decay(group)
            for i, group in enumerate(optimizer.param_groups)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _default_start(self) -> float:
        base = current_base(self._optimizers[0]) if self._optimizers else None
        if base is None:
            raise ValueError(
                "`WeightDecayScheduler` has no `start` and the optimizer shows no base weight decay: pass `start=`."
            )
        return base

    def _build(self, start: float) -> Schedule:
        total = self.total_steps if self.total_steps is not None else getattr(self, "_fit_length", None)
        if self.schedule == "constant":
            return constant(start, self.warmup_steps, self.warmup_start)
        if callable(self.schedule):
            return as_schedule(self.schedule, "schedule")
        if total is None or total == float("inf"):
            raise ValueError(
                "`WeightDecayScheduler` needs the schedule's length: pass `total_steps=`, or give the Trainer"
                " `max_steps` or `max_epochs`."
            )
        build = cosine if self.schedule == "cosine" else linear
        return build(start, float(self.end or 0.0), int(total), self.warmup_steps, self.warmup_start)


def _ratio(group: dict[str, Any], optimizer: Optimizer) -> float:
    base = current_base(optimizer)
    return effective_decay(group) / base if base else 1.0
