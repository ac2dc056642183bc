"""``WeightDecayScheduler``: the base weight decay over training, with every exclusion and multiplier kept.

Every param group gets ``base(t) x its decided multiplier``: excluded groups stay exactly 0, multiplier groups
scale along, masked and L1 groups through the step hook's ``hook_weight_decay`` (their ``weight_decay`` stays 0),
and groups added later by the fine-tuning callbacks are included. The schedule therefore keeps the weight-decay
invariant by construction: all decayed groups share one base at every step.

A Lightning callback, and a plain object for Fabric or a raw loop (``step()``, ``state_dict()``,
``load_state_dict()``). One schedule for all optimizers of a fit: each optimizer counts its own steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch.optim import Optimizer

from lightning_nodecay._invariant import current_base, effective_decay
from lightning_nodecay._lightning import Callback, logged_step
from lightning_nodecay._naming import logged_names
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

    A group's multiplier is its ``weight_decay_multiplier`` (every group the library builds carries one); a group
    built elsewhere keeps the ratio of its weight decay to the optimizer's default ``weight_decay`` that it had
    when the scheduler took the optimizer (or, for a group added later, when it first saw it).

    The effective decay of each group is logged as ``weight_decay/{group}`` (the key of
    ``WeightNormMonitor(log_weight_decay=True)``; with several optimizers ``weight_decay/{Optimizer}/{group}``)
    at the Trainer's ``log_every_n_steps`` (``interval="step"``) or at every epoch's start (``"epoch"``).
    Lightning's ``LearningRateMonitor(log_weight_decay=True)`` reads ``weight_decay`` only, so it shows 0 for
    masked and L1 groups, whose decay the hook applies: read ``weight_decay/{group}``.

    Its state (the steps taken) is saved in checkpoints; a resumed fit continues the schedule where it stopped.
    Each fit without a checkpoint starts the schedule afresh.

    Without ``start``, the schedule starts from the optimizer's default ``weight_decay`` as built by the code
    (read when the scheduler takes the optimizer: at construction, or at a fit's start, before a checkpoint's
    state is loaded). Without a Trainer, build the scheduler right after the optimizer, as a torch LR scheduler,
    and call :meth:`step` right before each ``optimizer.step()``.

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
        ValueError: an unknown ``schedule`` or ``interval``, a missing ``end``, a schedule without a length, or a
            bad value (named; a callable's negative value with its step).

    Examples:
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
        >>> scheduler.state_dict()
        {'steps': [3]}
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
        self._optimizers: list[Optimizer] = []
        self._steps: list[int] = []
        #: per optimizer, ``{group index: ratio}`` of the groups without a multiplier, taken from the fresh groups
        self._ratios: list[dict[int, float]] = []
        self._start: float | None = None
        self._fit_length: int | None = None
        self._function: Schedule | None = None
        if optimizers:
            self._take(optimizers)
            self._steps = [0] * len(self._optimizers)
            self._function = self._build()  # a bad schedule fails here, before training

    @property
    def state_key(self) -> str:
        """Tell apart several schedulers in one checkpoint (the same key in every run of the same code)."""
        schedule = self.schedule if isinstance(self.schedule, str) else _callable_name(self.schedule)
        return self._generate_state_key(schedule=schedule, interval=self.interval, end=self.end)

    def step(self, optimizer_index: int | None = None) -> None:
        """Set the base weight decay of the next step, then count it (every optimizer, or one of them)."""
        if not self._optimizers:
            raise ValueError(
                "`WeightDecayScheduler.step()` has no optimizers to schedule: pass `optimizers=[optimizer]` when"
                " using it without a Trainer (a Trainer gives it its optimizers at fit start)."
            )
        indices = range(len(self._optimizers)) if optimizer_index is None else [optimizer_index]
        for index in indices:
            self._apply(index, self._steps[index])
            self._steps[index] += 1

    def value(self, step: int) -> float:
        """The base weight decay at ``step``."""
        if self._function is None:
            self._function = self._build()
        return self._function(step)

    def state_dict(self) -> dict[str, Any]:
        """The steps each optimizer took, for checkpoints."""
        return {"steps": list(self._steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the schedule from a checkpoint's state."""
        self._steps = list(state_dict["steps"])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start every fit afresh: a checkpoint's state, if any, is loaded after this."""
        if stage == "fit":
            self._steps, self._function = [], None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the fit's optimizers, know its length and build the schedule: a bad one fails before training.

        The optimizers are as the code built them: a checkpoint's state is loaded into them after this.
        """
        self._take(trainer.optimizers)
        if self.interval == "step":
            stepping = trainer.estimated_stepping_batches
            self._fit_length = int(stepping) if math.isfinite(stepping) else None
        else:
            epochs = trainer.max_epochs
            self._fit_length = epochs if epochs is not None and epochs >= 0 else None
        self._function = self._build()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the Trainer's optimizers (after a resume restored them) and set the value of the coming step."""
        self._optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if not self._steps:
            self._steps = [0] * len(self._optimizers)
        elif len(self._steps) != len(self._optimizers):
            raise ValueError(
                f"The checkpoint's `WeightDecayScheduler` state counts the steps of {len(self._steps)} optimizer(s),"
                f" the fit has {len(self._optimizers)}: resume with the optimizers it was saved with."
            )
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
            self._log(trainer, index, logged_step(trainer))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the base weight decay of this epoch."""
        if self.interval == "epoch":
            for index in range(len(self._optimizers)):
                self._steps[index] = trainer.current_epoch
                self._apply(index, trainer.current_epoch)
                self._log(trainer, index, trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _take(self, optimizers: Sequence[Optimizer]) -> None:
        """Schedule ``optimizers``: their base weight decay and the ratios of their groups, as they are now."""
        self._optimizers = [unwrap_optimizer(o) for o in optimizers]
        self._ratios = [
            {
                i: _ratio(group, optimizer)
                for i, group in enumerate(optimizer.param_groups)
                if _multiplier(group) is None
            }
            for optimizer in self._optimizers
        ]
        self._start = self.start if self.start is not None else self._default_start()

    def _apply(self, index: int, step: int) -> None:
        """Give every group of optimizer ``index`` base(``step``) x its multiplier."""
        optimizer = self._optimizers[index]
        base = self.value(step)
        ratios = self._ratios[index]
        for i, group in enumerate(optimizer.param_groups):
            multiplier = _multiplier(group)
            if multiplier is None:  # a group the rules did not build: its ratio to the base when first seen
                multiplier = ratios.setdefault(i, _ratio(group, optimizer))
            group[HOOK_WEIGHT_DECAY if HOOK_WEIGHT_DECAY in group else WEIGHT_DECAY] = base * multiplier

    def _log(self, trainer: pl.Trainer, index: int, step: int | None) -> None:
        if not self.log_weight_decay or not trainer.loggers or step is None:
            return
        optimizer = self._optimizers[index]
        names = logged_names(self._optimizers, "WeightDecayScheduler")[index]
        metrics = {
            f"weight_decay/{name}": effective_decay(group)
            for name, group in zip(names, optimizer.param_groups, strict=True)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _default_start(self) -> float | None:
        """The optimizers' base weight decay: the first one's default ``weight_decay``, else what its groups show."""
        if not self._optimizers:
            return None
        optimizer = self._optimizers[0]
        default = optimizer.defaults.get(WEIGHT_DECAY)
        return float(default) if default is not None else current_base(optimizer)

    def _build(self) -> Schedule:
        if callable(self.schedule):
            return as_schedule(self.schedule, "schedule")
        start = self._start if self._start is not None else self.start
        if start is None:
            raise ValueError(
                "`WeightDecayScheduler` has no `start` and the optimizer shows no base weight decay: pass `start=`."
            )
        if self.schedule == "constant":
            return constant(start, self.warmup_steps, self.warmup_start)
        total = self.total_steps if self.total_steps is not None else self._fit_length
        if total is None:
            length = (
                "give the Trainer `max_steps` or `max_epochs`"
                if self.interval == "step"
                else "give the Trainer `max_epochs`"
            )
            raise ValueError(
                f"`WeightDecayScheduler({self.schedule!r})` needs the schedule's length: pass `total_steps=`"
                f" ({'optimizer steps' if self.interval == 'step' else 'epochs'}), or {length}."
            )
        build = cosine if self.schedule == "cosine" else linear
        return build(start, float(self.end or 0.0), total, self.warmup_steps, self.warmup_start)


def _multiplier(group: dict[str, Any]) -> float | None:
    multiplier = group.get(WEIGHT_DECAY_MULTIPLIER)
    return None if multiplier is None else float(multiplier)


def _ratio(group: dict[str, Any], optimizer: Optimizer) -> float:
    """The ratio of a group without a multiplier to its optimizer's default weight decay (the value torch fills in)."""
    default = optimizer.defaults.get(WEIGHT_DECAY)
    base = float(default) if default is not None else current_base(optimizer)
    return effective_decay(group) / base if base else 1.0


def _callable_name(schedule: Callable[[int], float]) -> str:
    """A name of ``schedule`` that is the same in every run (no memory address)."""
    return str(getattr(schedule, "__qualname__", type(schedule).__qualname__))
