"""Weight-decay schedules: pure, stateless functions of an integer step, for a future ``WeightDecayScheduler``.

A schedule maps a step to the *base* weight decay of that step, e.g. DINO/iBOT's cosine ramp from 0.04 to
0.4 (:func:`cosine`) or Megatron's linear ``start_wd`` -> ``end_wd`` (:func:`linear`). Schedules are
unit-agnostic: a step is whatever the caller counts, optimizer steps (``trainer.global_step``, with
``total_steps=trainer.estimated_stepping_batches``) or epochs (``trainer.current_epoch``, with
``total_steps=trainer.max_epochs``). Every schedule is a frozen dataclass, validated when built; calling it
with a step returns a float.

Warm-up convention, shared by all schedules and identical to DINO's ``cosine_scheduler``: the warm-up takes
steps ``0 .. warmup_steps - 1`` and its values are ``numpy.linspace(warmup_start, start, warmup_steps)``,
endpoint included. So the last warm-up step already has the value ``start``, and the next phase starts from
``start`` again at step ``warmup_steps``; a one-step warm-up is ``warmup_start`` alone (as
``numpy.linspace(a, b, 1) == [a]``). ``warmup_steps=0`` means no warm-up. After the warm-up, the values of
:func:`cosine` and :func:`linear` stay within ``[min(start, end), max(start, end)]``, float rounding included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

#: What a schedule is to its caller: the base weight decay of a step.
Schedule: TypeAlias = Callable[[int], float]
#: What :func:`as_schedule` accepts: a schedule or plain callable, or a float for a constant weight decay.
ScheduleSpec: TypeAlias = float | Schedule


@dataclass(frozen=True)
class _Ramp:
    """Linear warm-up, then a ramp from ``start`` to ``end`` over the remaining steps; ``end`` after them."""

    start: float
    end: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        _check_weight_decays(start=self.start, end=self.end, warmup_start=self.warmup_start)
        _check_steps(self.total_steps, self.warmup_steps)

    def __call__(self, step: int) -> float:
        """The weight decay at ``step``."""
        if _check_step(step) < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.warmup_start, self.start)
        if step >= self.total_steps:
            return float(self.end)
        done, length = step - self.warmup_steps, self.total_steps - self.warmup_steps
        return _between(self._ramp(done / length), self.start, self.end)

    def _ramp(self, fraction: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class CosineSchedule(_Ramp):
    """Linear warm-up, then a cosine from ``start`` to ``end``; built by :func:`cosine`, which documents it.

    Examples:
        >>> CosineSchedule(0.04, 0.4, total_steps=10) == cosine(0.04, 0.4, 10)
        True
    """

    def _ramp(self, fraction: float) -> float:
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True)
class LinearSchedule(_Ramp):
    """Linear warm-up, then a line from ``start`` to ``end``; built by :func:`linear`, which documents it.

    Examples:
        >>> LinearSchedule(0.0, 0.1, total_steps=10) == linear(0.0, 0.1, 10)
        True
    """

    def _ramp(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * fraction


@dataclass(frozen=True)
class ConstantSchedule:
    """Linear warm-up, then ``value`` forever; built by :func:`constant`, which documents it.

    Examples:
        >>> ConstantSchedule(0.05) == constant(0.05)
        True
    """

    value: float
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        _check_weight_decays(value=self.value, warmup_start=self.warmup_start)
        _check_warmup_steps(self.warmup_steps)

    def __call__(self, step: int) -> float:
        """The weight decay at ``step``."""
        if _check_step(step) < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.warmup_start, self.value)
        return float(self.value)


def cosine(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> CosineSchedule:
    """A cosine schedule from ``start`` to ``end``, after a linear warm-up; DINO's ``cosine_scheduler``.

    The values are exactly those of DINO's ``utils.cosine_scheduler(start, end, epochs, niter_per_ep,
    warmup_epochs, warmup_start)`` with ``total_steps = epochs * niter_per_ep`` and
    ``warmup_steps = warmup_epochs * niter_per_ep``, including its two details: the warm-up is
    ``numpy.linspace`` with its endpoint, so its last step is already ``start`` (see the module's warm-up
    convention), and the cosine divides by its length ``n = total_steps - warmup_steps``, so at step
    ``warmup_steps + i`` it is ``end + (start - end) * (1 + cos(pi * i / n)) / 2`` and never quite reaches
    ``end`` before ``total_steps``. From ``total_steps`` on, the value is ``end``.

    Args:
        start: weight decay at the end of the warm-up, where the cosine begins (DINO's ``base_value``).
        end: weight decay that the cosine approaches, and the value from ``total_steps`` on.
        total_steps: length of the schedule, warm-up included, in the caller's unit (steps or epochs).
        warmup_steps: length of the warm-up, at most ``total_steps``; 0 for none.
        warmup_start: weight decay at step 0 of the warm-up (DINO's ``start_warmup_value``).

    Returns:
        A frozen :class:`CosineSchedule`; call it with a step to get the weight decay.

    Raises:
        TypeError: a weight decay is not a float, or a step count not an int.
        ValueError: a weight decay is negative or not finite, ``total_steps <= 0``, ``warmup_steps < 0`` or
            ``warmup_steps > total_steps``.

    Examples:
        DINO's weight decay, rising from 0.04 to 0.4 over 4 steps, with a 2-step warm-up from 0 added:

        >>> wd = cosine(0.04, 0.4, total_steps=4)
        >>> [round(wd(step), 4) for step in range(6)]
        [0.04, 0.0927, 0.22, 0.3473, 0.4, 0.4]
        >>> wd = cosine(0.04, 0.4, total_steps=6, warmup_steps=2)
        >>> [round(wd(step), 4) for step in range(8)]
        [0.0, 0.04, 0.04, 0.0927, 0.22, 0.3473, 0.4, 0.4]
    """
    return CosineSchedule(start, end, total_steps, warmup_steps, warmup_start)


def linear(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> LinearSchedule:
    """A linear schedule from ``start`` to ``end``, after a linear warm-up; Megatron's "linear" weight decay.

    After the warm-up (see the module's warm-up convention), at step ``warmup_steps + i`` the value is
    ``start + (end - start) * i / n`` with ``n = total_steps - warmup_steps``: it reaches ``end`` at
    ``total_steps`` and stays there. Without warm-up this is Megatron's ``start_wd`` -> ``end_wd`` increment
    with ``wd_incr_style="linear"`` over ``wd_incr_steps = total_steps``.

    Args:
        start: weight decay at the end of the warm-up, where the line begins (Megatron's ``start_wd``).
        end: weight decay reached at ``total_steps`` and kept after it (Megatron's ``end_wd``).
        total_steps: length of the schedule, warm-up included, in the caller's unit (steps or epochs).
        warmup_steps: length of the warm-up, at most ``total_steps``; 0 for none.
        warmup_start: weight decay at step 0 of the warm-up.

    Returns:
        A frozen :class:`LinearSchedule`; call it with a step to get the weight decay.

    Raises:
        TypeError: a weight decay is not a float, or a step count not an int.
        ValueError: a weight decay is negative or not finite, ``total_steps <= 0``, ``warmup_steps < 0`` or
            ``warmup_steps > total_steps``.

    Examples:
        >>> wd = linear(0.0, 0.1, total_steps=4)
        >>> [round(wd(step), 4) for step in range(6)]
        [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]
        >>> wd = linear(0.1, 0.0, total_steps=5, warmup_steps=3, warmup_start=0.05)
        >>> [round(wd(step), 4) for step in range(6)]
        [0.05, 0.075, 0.1, 0.1, 0.05, 0.0]
    """
    return LinearSchedule(start, end, total_steps, warmup_steps, warmup_start)


def constant(value: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> ConstantSchedule:
    """A constant weight decay ``value``, after a linear warm-up (see the module's warm-up convention).

    Args:
        value: weight decay from the end of the warm-up on.
        warmup_steps: length of the warm-up in the caller's unit (steps or epochs); 0 for none.
        warmup_start: weight decay at step 0 of the warm-up.

    Returns:
        A frozen :class:`ConstantSchedule`; call it with a step to get the weight decay.

    Raises:
        TypeError: a weight decay is not a float, or ``warmup_steps`` not an int.
        ValueError: a weight decay is negative or not finite, or ``warmup_steps < 0``.

    Examples:
        >>> wd = constant(0.05, warmup_steps=3)
        >>> [round(wd(step), 4) for step in range(5)]
        [0.0, 0.025, 0.05, 0.05, 0.05]
    """
    return ConstantSchedule(value, warmup_steps, warmup_start)


def as_schedule(spec: ScheduleSpec, name: str = "spec") -> Schedule:
    """The schedule that ``spec`` describes: a schedule as is, a float as a constant, a callable checked.

    A plain callable ``step -> float`` is wrapped so that each value it returns is checked when it is called:
    a value that is negative or not finite raises a ``ValueError``, one that is not a float a ``TypeError``,
    each naming ``name`` and the step.

    Args:
        spec: a schedule (:func:`cosine`, :func:`linear`, :func:`constant`), a callable ``step -> float``,
            or a float for a constant weight decay.
        name: the caller's name for ``spec``, which error messages show.

    Returns:
        A callable from an int step to a float weight decay.

    Raises:
        TypeError: ``spec`` is none of the above.
        ValueError: ``spec`` is a float that is negative or not finite.

    Examples:
        >>> as_schedule(0.05)(1000)
        0.05
        >>> as_schedule(lambda step: 0.1 / (1 + step))(4)
        0.02
        >>> as_schedule(lambda step: 0.05 * (10 - step), name="weight_decay")(12)
        Traceback (most recent call last):
        ...
        ValueError: `weight_decay` at step 12 is -0.1; a weight decay must be a finite float >= 0, such as 0.05.
    """
    if isinstance(spec, (CosineSchedule, LinearSchedule, ConstantSchedule)):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantSchedule(_check_weight_decay(spec, f"`{name}`"))
    if callable(spec):
        return _CheckedSchedule(spec, name)
    raise TypeError(
        f"`{name}` must be a schedule such as `cosine(0.04, 0.4, total_steps)`, a callable `step -> float` or a"
        f" float such as 0.05; got {spec!r}."
    )


@dataclass(frozen=True)
class _CheckedSchedule:
    """A plain callable whose every value is checked to be a weight decay."""

    function: Schedule
    name: str

    def __call__(self, step: int) -> float:
        return _check_weight_decay(self.function(step), f"`{self.name}` at step {step}")


def _warmup(step: int, warmup_steps: int, warmup_start: float, start: float) -> float:
    """``numpy.linspace(warmup_start, start, warmup_steps)[step]``, exact at both ends."""
    fraction = step / max(warmup_steps - 1, 1)  # a one-step linspace is its start alone
    return (1.0 - fraction) * warmup_start + fraction * start


def _between(value: float, start: float, end: float) -> float:
    """``value`` kept within ``[start, end]`` (either order), where float rounding may leave it by an ulp."""
    return float(min(max(value, min(start, end)), max(start, end)))


def _check_weight_decays(**values: float) -> None:
    for name, value in values.items():
        _check_weight_decay(value, f"`{name}`")


def _check_weight_decay(value: object, described: str) -> float:
    """``value`` as a float if it is a weight decay, a finite number >= 0; ``described`` names it in errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{described} must be a float such as 0.05; got {value!r}.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{described} is {value!r}; a weight decay must be a finite float >= 0, such as 0.05.")
    return float(value)


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    _check_int(total_steps, "total_steps")
    if total_steps <= 0:
        raise ValueError(
            f"`total_steps` is {total_steps}; pass the schedule's length, a positive number of optimizer steps"
            " (e.g. `trainer.estimated_stepping_batches`) or epochs (e.g. `trainer.max_epochs`)."
        )
    _check_warmup_steps(warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"`warmup_steps` ({warmup_steps}) is more than `total_steps` ({total_steps}); the warm-up is part of the"
            f" schedule, so pass `warmup_steps <= total_steps`."
        )


def _check_warmup_steps(warmup_steps: int) -> None:
    _check_int(warmup_steps, "warmup_steps")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` is {warmup_steps}; pass 0 for no warm-up, or a positive number of steps.")


def _check_step(step: int) -> int:
    _check_int(step, "step")
    if step < 0:
        raise ValueError(
            f"`step` is {step}; schedules start at step 0: pass `trainer.global_step` or `trainer.current_epoch`."
        )
    return step


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, a number of steps or epochs; got {value!r}. Pass `int(...)`.")
