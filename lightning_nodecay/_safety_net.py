"""Make the decisions hold however the optimizer was built. Pure PyTorch.

If an optimizer holds a parameter in a decayed group whose decay differs from the parameter's decision
(LightningCLI's ``--optimizer`` replaced ``configure_optimizers``; a user wrote ``AdamW(self.parameters())``),
the group is split in place, before any step: each such parameter moves to a new group that copies every
hyperparameter of the old one, with ``weight_decay`` = its multiplier x the old group's base decay (0 for
excluded parameters) and the ``weight_decay_penalty`` of an L1 decision. LR schedulers attached to the
optimizer learn about each new group, so it keeps following the schedule.

An optimizer that keeps one entry per group from its construction (``zip(self.param_groups, self.base_lrs)``)
cannot take new groups safely: it would never step them, or crash. Such an optimizer is refused with the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_nodecay._naming import group_name, listed
from lightning_nodecay._remap import LR_LISTS, per_group_lists
from lightning_nodecay._schema import (
    INITIAL_LR,
    LR,
    LR_MULTIPLIER,
    NAME,
    PARAMS,
    PENALTY,
    TOWARD,
    WEIGHT_DECAY,
    WEIGHT_DECAY_MULTIPLIER,
    Penalty,
    Toward,
)
from lightning_nodecay._semantics import exclude_own_decay
from lightning_nodecay.groups import DecayDecision, decided_group_name, group_order

#: A decision without its parameter: ``(multiplier, penalty, lr multiplier, toward)``.
_Kind = tuple[float, Penalty, float, Toward]


def split_by_decisions(
    optimizer: Optimizer, decisions: Iterable[DecayDecision], schedulers: Iterable[Any] = ()
) -> list[str]:
    """Give every parameter of ``optimizer``'s decayed groups the decay its decision says, splitting groups in place.

    Must run before the first step and before optimizer state is loaded. A decayed group stands for one
    decision: its ``weight_decay_multiplier`` when the library built it; else the one multiplier its decayed
    parameters share (a hand-built ``decay_x2`` group stays as it is); else the multiplier that gives its
    ``weight_decay`` from the optimizer's default; else 1 (its ``weight_decay`` is the base). Its base is
    ``weight_decay / multiplier``. A group named ``g`` gives ``g_no_decay``, ``g_decay_x2``, ``g_decay_l1``,
    ...; unnamed groups are named ``pg1``, ``pg2``, ... by position first, except a single unnamed group, which
    becomes ``decay`` and gives ``no_decay``, ``decay_x2``, ...

    Args:
        optimizer: the optimizer to fix.
        decisions: the decisions of :func:`~lightning_nodecay.decide` for the model.
        schedulers: LR schedulers of ``optimizer``; their per-group lists get an entry for each new group.

    Returns:
        One message per group that changed (empty when nothing had to change).

    Raises:
        ValueError: the optimizer keeps per-group lists from its construction, so a new group is unsafe.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay import decide
        >>> net = nn.Linear(2, 2)
        >>> optimizer = torch.optim.AdamW(net.parameters(), weight_decay=0.1)
        >>> split_by_decisions(optimizer, decide(net))
        ['AdamW group `pg1`: moved 1 excluded tensor (bias) to new group `no_decay` with weight_decay=0.0']
        >>> [(g["name"], g["weight_decay"]) for g in optimizer.param_groups]
        [('decay', 0.1), ('no_decay', 0.0)]
    """
    by_param = {id(d.param): d for d in decisions}
    lr_declared = any(d.lr_multiplier != 1 or d.layer is not None for d in by_param.values())
    messages = []
    for index, group in enumerate(list(optimizer.param_groups)):
        decayed = bool(group.get(WEIGHT_DECAY))
        if not decayed and not lr_declared:
            continue
        decided = [(p, by_param[id(p)]) for p in group[PARAMS] if id(p) in by_param]
        own = _own_kind(optimizer, group, [d for _, d in decided])
        moving: dict[_Kind, list[nn.Parameter]] = {}
        for param, d in decided:
            # an undecayed group keeps its own decay: only the learning rate can move a parameter out of it
            multiplier, penalty, toward = (d.multiplier, d.penalty, d.toward) if decayed else (own[0], own[1], own[3])
            kind = (multiplier, penalty, d.lr_multiplier, toward)
            if kind != own:
                moving.setdefault(kind, []).append(param)
        if moving:
            ordered = dict(sorted(moving.items(), key=lambda item: _kind_order(item[0])))
            messages += _split(optimizer, index, own, ordered, by_param, schedulers, lr_declared)
    exclude_own_decay(optimizer)
    return messages


def _kind_order(kind: _Kind) -> tuple[Any, ...]:
    return kind[2], kind[3] != "zero", *group_order(kind[:2])


def _own_kind(optimizer: Optimizer, group: dict[str, Any], decided: list[DecayDecision]) -> _Kind:
    """The decision a group stands for: the multipliers it carries; else the one multiplier its (decayed)
    parameters share; else the multiplier that gives its value from the optimizer's default; else 1."""
    multiplier = group.get(WEIGHT_DECAY_MULTIPLIER)
    if multiplier is None:
        decayed = {d.multiplier for d in decided if d.multiplier}
        multiplier = _factor(decayed, group.get(WEIGHT_DECAY), optimizer.defaults.get(WEIGHT_DECAY))
    lr_multiplier = group.get(LR_MULTIPLIER)
    if lr_multiplier is None:
        shared = {d.lr_multiplier for d in decided}
        lr_multiplier = _factor(shared, group.get(LR), optimizer.defaults.get(LR))
    return multiplier, group.get(PENALTY, "l2"), lr_multiplier, group.get(TOWARD, "zero")


def _factor(candidates: set[float], value: float | None, default: float | None) -> float:
    """The multiplier that gives ``value`` from ``default`` (1 when they are equal: the group was built with the
    optimizer's own value, which the rules' multipliers then scale), else the one candidate, else 1."""
    if default and value is not None:
        for candidate in sorted(candidates | {1.0}):
            if math.isclose(candidate * default, value):
                return candidate
    return candidates.pop() if len(candidates) == 1 else 1.0


def _split(
    optimizer: Optimizer,
    index: int,
    own: _Kind,
    moving: dict[_Kind, list[nn.Parameter]],
    by_param: dict[int, DecayDecision],
    schedulers: Iterable[Any],
    lr_declared: bool,
) -> list[str]:
    """Move the ``moving`` parameters of group ``index`` to a group per kind; the last kind may keep the group."""
    group = optimizer.param_groups[index]
    template = dict(group)  # what every new group copies, as the group was before this split
    base = (group.get(WEIGHT_DECAY, 0.0) / own[0] if own[0] else group.get(WEIGHT_DECAY, 0.0), own[2])
    label = group_name(group, index)
    prefix = label if NAME in group or len(optimizer.param_groups) > 1 else ""
    what = f"{type(optimizer).__name__} group `{label}`"
    moved = {id(p) for params in moving.values() for p in params}
    kept = [p for p in group[PARAMS] if id(p) not in moved]
    if kept or len(moving) > 1:
        _refuse_per_group_caches(optimizer)
    messages, converted = [], None
    if kept:
        group[PARAMS], group[NAME] = kept, prefix or _named("", own)
        if lr_declared:
            group[LR_MULTIPLIER] = own[2]
    else:  # the whole group is of other kinds: the last kind keeps it
        converted, params = moving.popitem()
        group[PARAMS], group[NAME] = params, group.get(NAME) or _named(prefix, converted)
        _set_kind(group, converted, base, lr_declared)
        messages.append(f"{what}: {_moved(params, converted, by_param)}: the whole group, set its {_describe(group)}")
    for kind, params in moving.items():
        new_group = {**template, PARAMS: params, NAME: _named(prefix, kind)}
        _set_kind(new_group, kind, base, lr_declared)
        optimizer.add_param_group(new_group)
        _extend_schedulers(optimizer, schedulers, index, kind[2] / own[2])
        messages.append(
            f"{what}: {_moved(params, kind, by_param)} to new group `{new_group[NAME]}` with {_describe(new_group)}"
        )
    if converted is not None and lr_declared:
        _scale_schedulers(optimizer, schedulers, index, converted[2] / own[2])
    return messages


def _set_kind(group: dict[str, Any], kind: _Kind, base: tuple[float, float], lr_declared: bool) -> None:
    """Give ``group`` the decay (and learning rate) of ``kind``: multiplier x the base of the group it came from."""
    multiplier, penalty, lr_multiplier, toward = kind
    group.update({WEIGHT_DECAY: multiplier * base[0], WEIGHT_DECAY_MULTIPLIER: multiplier})
    group.pop(PENALTY, None)
    group.pop(TOWARD, None)
    if penalty != "l2" and multiplier:
        group[PENALTY] = penalty
    if toward != "zero" and multiplier:
        group[TOWARD] = toward
    if lr_declared:
        scale = lr_multiplier / base[1]
        group.update({LR_MULTIPLIER: lr_multiplier, LR: group[LR] * scale})
        if INITIAL_LR in group:
            group[INITIAL_LR] *= scale


def _named(prefix: str, kind: _Kind) -> str:
    name = decided_group_name(*kind)
    return f"{prefix}_{name}" if prefix else name


def _describe(group: dict[str, Any]) -> str:
    forms = "".join(f", {key}={group[key]!r}" for key in (PENALTY, TOWARD) if key in group)
    return f"weight_decay={float(group[WEIGHT_DECAY])}{forms}"


def _moved(params: Sequence[nn.Parameter], kind: _Kind, by_param: dict[int, DecayDecision]) -> str:
    what = "excluded tensor" if kind[0] == 0 else "tensor"
    return f"moved {len(params)} {what}{'s' * (len(params) > 1)} ({listed([by_param[id(p)].name for p in params])})"


def _refuse_per_group_caches(optimizer: Optimizer) -> None:
    """Refuse an optimizer that keeps lists with one entry per param group from its construction."""
    count = len(optimizer.param_groups)
    cached = sorted(
        name
        for name, value in vars(optimizer).items()
        if name != "param_groups" and isinstance(value, (list, tuple)) and len(value) == count
    )
    if cached:
        label = type(optimizer).__name__
        raise ValueError(
            f"`{label}` keeps one entry per param group from its construction ({listed(cached, quoted=True)}), so it"
            " cannot take the new groups the weight-decay rules need: it would never step them, or fail. Build it"
            " on the right groups instead: let `NoDecayMixin.configure_optimizers` build it (set `self.optimizer`"
            f" to `functools.partial({label}, ...)`), or pass `lightning_nodecay.param_groups(model)` to it."
        )


def _scale_schedulers(optimizer: Optimizer, schedulers: Iterable[Any], index: int, lr_scale: float) -> None:
    """Scale the learning rates that ``optimizer``'s schedulers keep for group ``index`` by ``lr_scale``."""
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        _scale_schedulers(optimizer, getattr(scheduler, "_schedulers", ()), index, lr_scale)
        for key, values in per_group_lists(vars(scheduler), len(optimizer.param_groups)).items():
            if key in LR_LISTS:
                values[index] *= lr_scale


def _extend_schedulers(optimizer: Optimizer, schedulers: Iterable[Any], source: int, lr_scale: float) -> None:
    """Give the per-group lists of ``optimizer``'s schedulers (nested ones too) an entry for the group just added.

    The new group copies group ``source``, its learning rates scaled by ``lr_scale``; lists a nested scheduler
    shares with its parent grow once.
    """
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        _extend_schedulers(optimizer, getattr(scheduler, "_schedulers", ()), source, lr_scale)
        for key, values in per_group_lists(vars(scheduler), len(optimizer.param_groups) - 1).items():
            values.append(values[source] * lr_scale if key in LR_LISTS else values[source])
