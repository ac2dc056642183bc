"""The weight-decay invariant, checked against an optimizer as it really is. Pure PyTorch.

**Every trainable parameter's effective weight decay equals the base value x its decided multiplier x its
mask, and excluded parameters get exactly zero.** A group's *effective* decay is its ``weight_decay`` plus the
``hook_weight_decay`` the step hook applies in its place; the *base* is the same for every decayed group of
one optimizer (the optimizer's ``weight_decay``, or whatever a schedule made of it: scaling every decayed
group by the same factor keeps the invariant).

:class:`DecayInvariant` checks it for one optimizer:

- per parameter, whenever group membership may have changed (a fingerprint of the groups: their identity,
  their ``params`` lists and lengths): every group holds parameters of one decision (multiplier and
  penalty), L1 and masked groups are exactly the groups the step hook takes over;
- per group, on every call, in O(number of groups): hooked groups leave ``weight_decay`` at 0, excluded
  groups have an effective decay of exactly 0, and the decayed groups agree on one base.

A violation raises ``ValueError`` before the step, naming the group, the first parameters, the expected and
found values, and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

from lightning_nodecay._naming import group_name, listed
from lightning_nodecay._schema import (
    HOOK_WEIGHT_DECAY,
    LR,
    LR_FAMILY,
    PARAMS,
    PENALTY,
    TOWARD,
    WEIGHT_DECAY,
    WEIGHT_DECAY_MULTIPLIER,
    Penalty,
    Toward,
)
from lightning_nodecay._semantics import own_decay_keys
from lightning_nodecay.groups import DecayDecision, decided_group_name
from lightning_nodecay.hook import WeightDecayHook

_MIXED = None  # the multiplier of a group whose parameters the rules decay differently


@dataclass(frozen=True)
class _GroupPlan:
    """What the decisions say about one param group: its multiplier (``None``: mixed) and a few names."""

    index: int
    multiplier: float | None
    names: tuple[str, ...]
    hooked: bool
    #: the learning-rate multiplier its parameters share, when the rules declare learning-rate multipliers
    lr_multiplier: float | None = None


def effective_decay(group: Mapping[str, Any]) -> float:
    """The weight decay a group really gets: the optimizer's ``weight_decay`` plus the hook's.

    Examples:
        >>> effective_decay({"weight_decay": 0.0, "hook_weight_decay": 0.05}), effective_decay({"weight_decay": 0.1})
        (0.05, 0.1)
    """
    return float(group.get(WEIGHT_DECAY, 0.0) or 0.0) + float(group.get(HOOK_WEIGHT_DECAY, 0.0) or 0.0)


def current_base(optimizer: Optimizer) -> float | None:
    """The base weight decay ``optimizer`` applies now: from a decayed group the library built (a schedule may
    have changed it since), else its default ``weight_decay`` (``None`` when neither tells).

    Examples:
        >>> import torch
        >>> w = torch.zeros(2, requires_grad=True)
        >>> current_base(torch.optim.AdamW([{"params": [w], "weight_decay": 0.3, "weight_decay_multiplier": 2.0}]))
        0.15
    """
    for group in optimizer.param_groups:
        multiplier = group.get(WEIGHT_DECAY_MULTIPLIER)
        if multiplier:
            return effective_decay(group) / multiplier
    default = optimizer.defaults.get(WEIGHT_DECAY)
    return None if default is None else float(default)


class DecayInvariant:
    """Check the weight-decay invariant of one optimizer against the decisions its groups should follow.

    Args:
        decisions: gives the current decisions of the model (frozen parameters have none and are not checked);
            called again whenever group membership changed, e.g. after unfreezing.
        culprit: who may have broken the invariant, for messages.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay import decide, param_groups
        >>> net = nn.Linear(2, 2)
        >>> optimizer = torch.optim.AdamW(param_groups(net), weight_decay=0.1)
        >>> invariant = DecayInvariant(lambda: decide(net))
        >>> invariant.check(optimizer)
        >>> optimizer.param_groups[1]["weight_decay"] = 0.1  # decay the biases
        >>> invariant.check(optimizer)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Param group `no_decay` of `AdamW` (`bias`) holds parameters excluded from weight decay but ...
    """

    def __init__(
        self,
        decisions: Callable[[], Iterable[DecayDecision]],
        culprit: str = "by a callback, a scheduler or other code",
    ) -> None:
        self._current_decisions = decisions
        self._decisions: dict[int, DecayDecision] = {}
        self._culprit = culprit
        self._fingerprint: tuple[Any, ...] | None = None
        self._plans: list[_GroupPlan] = []

    def check(self, optimizer: Optimizer) -> None:
        """Raise ``ValueError`` if ``optimizer`` breaks the invariant; per parameter only when membership changed."""
        fingerprint = _fingerprint(optimizer.param_groups)
        if fingerprint != self._fingerprint:
            self._decisions = {id(d.param): d for d in self._current_decisions()}
            self._plans = self._plan(optimizer)
            self._fingerprint = fingerprint
        self._check_values(optimizer)

    def _plan(self, optimizer: Optimizer) -> list[_GroupPlan]:
        hook = WeightDecayHook.of(optimizer)
        hooked = set(hook.hooked_groups) if hook is not None else set()
        lr_declared = any(d.lr_multiplier != 1 or d.layer is not None for d in self._decisions.values())
        plans = []
        for index, group in enumerate(optimizer.param_groups):
            decided = [self._decisions[id(p)] for p in group[PARAMS] if id(p) in self._decisions]
            if not decided:
                continue
            kinds = {(d.multiplier, d.penalty, d.toward) for d in decided}
            self._check_membership(optimizer, index, decided, kinds, hook)
            multiplier = next(iter(kinds))[0] if len(kinds) == 1 else _MIXED
            names = tuple(d.name for d in decided[:5])
            lr_multiplier = self._shared_lr(optimizer, index, decided) if lr_declared else None
            plans.append(_GroupPlan(index, multiplier, names, index in hooked, lr_multiplier))
        return plans

    def _shared_lr(self, optimizer: Optimizer, index: int, decided: Sequence[DecayDecision]) -> float:
        """The one learning-rate multiplier of the group's parameters, or a clear error."""
        multipliers = {d.lr_multiplier for d in decided}
        if len(multipliers) > 1:
            found = ", ".join(f"`{d.name}` x{d.lr_multiplier:g} ({d.lr_reason})" for d in _one_per_lr(decided))
            raise ValueError(
                f"Param group `{group_name(optimizer.param_groups[index], index)}` of `{type(optimizer).__name__}`"
                f" mixes parameters whose declared learning rates differ ({found}), so one of them would train at"
                f" the wrong rate. {self._fix()}"
            )
        return multipliers.pop()

    def _check_membership(
        self,
        optimizer: Optimizer,
        index: int,
        decided: Sequence[DecayDecision],
        kinds: set[tuple[float, Penalty, Toward]],
        hook: WeightDecayHook | None,
    ) -> None:
        group = optimizer.param_groups[index]
        where = f"Param group `{group_name(group, index)}` of `{type(optimizer).__name__}`"
        penalties = {penalty for _, penalty, _ in kinds}
        targets = {toward for _, _, toward in kinds}
        if len(kinds) > 1 and effective_decay(group):
            excluded = [d.name for d in decided if d.multiplier == 0]
            if excluded:
                raise ValueError(
                    f"{where} holds parameters excluded from weight decay ({listed(excluded, quoted=True)}) next to"
                    f" decayed ones, with weight_decay={effective_decay(group):g}, so they would be decayed."
                    " Lightning's `BaseFinetuning.unfreeze_and_add_param_group` (e.g. `BackboneFinetuning`) does"
                    " this: use `lightning_nodecay.NoDecayBackboneFinetuning`, subclass"
                    " `lightning_nodecay.NoDecayFinetuning`, or call"
                    f" `lightning_nodecay.unfreeze_and_add_param_groups`. {self._fix()}"
                )
            found = ", ".join(f"`{d.name}` x{d.multiplier:g}" for d in _one_per_kind(decided))
            raise ValueError(
                f"{where} mixes parameters whose declared weight decay differs ({found}), so one of them would get"
                f" the wrong decay. {self._fix()}"
            )
        if penalties == {"l1"} and group.get(PENALTY) != "l1" and effective_decay(group):
            raise ValueError(
                f"{where} holds parameters with an L1 penalty ({listed([d.name for d in decided], quoted=True)}) but"
                f" is no L1 group (`{PENALTY}='l1'`), so they would get L2. {self._fix()}"
            )
        if targets == {"initial"} and group.get(TOWARD) != "initial" and effective_decay(group):
            raise ValueError(
                f"{where} holds parameters to decay toward their reference"
                f" ({listed([d.name for d in decided], quoted=True)}) but is no reference group"
                f" (`{TOWARD}='initial'`), so they would decay toward zero. {self._fix()}"
            )
        needs_hook = group.get(PENALTY) == "l1" or group.get(TOWARD) == "initial" or HOOK_WEIGHT_DECAY in group
        covered = hook is not None and index in hook.hooked_groups
        if needs_hook and not covered and effective_decay(group):
            raise ValueError(
                f"{where} carries `{HOOK_WEIGHT_DECAY}`/`{PENALTY}`/`{TOWARD}` (masks, L1 or a reference) but no"
                " weight-decay step hook applies it, so its parameters would not be decayed as declared (a checkpoint"
                " of such a run restored into an optimizer without the hook, or a group added after fit start"
                " without `WeightDecayHook.add_groups`, does this). Attach the hook"
                " (`lightning_nodecay.attach_weight_decay_hook`), or rebuild the optimizer from the current rules."
            )
        if covered and hook is not None and not hook.holds(index, group[PARAMS]):
            raise ValueError(
                f"{where} no longer holds the parameters its weight-decay hook decays (masks and L1 are applied per"
                f" parameter, fixed when the hook was attached). {self._fix()}"
            )

    def _check_values(self, optimizer: Optimizer) -> None:
        groups, label = optimizer.param_groups, type(optimizer).__name__
        bases: list[tuple[_GroupPlan, float]] = []
        for plan in self._plans:
            group = groups[plan.index]
            where = f"Param group `{group_name(group, plan.index)}` of `{label}` ({listed(plan.names, quoted=True)})"
            decay = effective_decay(group)
            if plan.hooked and group.get(WEIGHT_DECAY):
                raise ValueError(
                    f"{where} is decayed by the step hook (masks or L1: `{HOOK_WEIGHT_DECAY}`="
                    f"{group.get(HOOK_WEIGHT_DECAY, 0.0):g}) but its `weight_decay` was set to {group[WEIGHT_DECAY]:g},"
                    " so it would be decayed twice, and masked-out elements too. A weight-decay schedule must write a"
                    f" hooked group's `{HOOK_WEIGHT_DECAY}` and leave its `weight_decay` at 0."
                )
            if plan.multiplier == 0 and (decay or _own_decay(optimizer, group)):
                found = decay or _own_decay(optimizer, group)
                raise ValueError(
                    f"{where} holds parameters excluded from weight decay but has decay {found:g} (expected exactly"
                    f" 0). {self._fix()}"
                )
            if plan.multiplier:
                bases.append((plan, decay / plan.multiplier))
        self._check_one_base(optimizer, bases)
        self._check_lr(optimizer)

    def _check_lr(self, optimizer: Optimizer) -> None:
        """Within each family of groups (``lr_family``), one base learning rate: ``lr / lr_multiplier`` agrees."""
        groups, label = optimizer.param_groups, type(optimizer).__name__
        families: dict[str, tuple[_GroupPlan, float]] = {}
        for plan in self._plans:
            if plan.lr_multiplier is None:
                continue
            group = groups[plan.index]
            base = float(group[LR]) / plan.lr_multiplier
            first = families.setdefault(str(group.get(LR_FAMILY, "")), (plan, base))
            if not math.isclose(base, first[1], rel_tol=1e-6, abs_tol=1e-15):
                one, other = groups[first[0].index], group
                raise ValueError(
                    f"The param groups of `{label}` no longer train at their declared learning-rate ratios:"
                    f" `{group_name(one, first[0].index)}` has lr {one[LR]:g} (x{first[0].lr_multiplier:g}, base"
                    f" {first[1]:g}) but `{group_name(other, plan.index)}` has lr {other[LR]:g}"
                    f" (x{plan.lr_multiplier:g}, base {base:g}). Something set the groups' learning rates alike"
                    " instead of scaling them from each group's own: `OneCycleLR` with one `max_lr` (pass one per"
                    " group: base x `lr_multiplier`), `ReduceLROnPlateau` reaching one `min_lr` or"
                    " `CosineAnnealingLR` reaching one `eta_min` (pass per-group values, or 0), Lightning's"
                    " `LearningRateFinder` callback inside the fit (run `Tuner(trainer).lr_find` before `fit`"
                    f" instead), or a callback. {self._fix()}"
                )

    def _check_one_base(self, optimizer: Optimizer, bases: list[tuple[_GroupPlan, float]]) -> None:
        groups, label = optimizer.param_groups, type(optimizer).__name__
        mixed = [plan for plan in self._plans if plan.multiplier is _MIXED and effective_decay(groups[plan.index])]
        if mixed:
            plan = mixed[0]
            raise ValueError(
                f"Param group `{group_name(groups[plan.index], plan.index)}` of `{label}` mixes parameters whose"
                f" declared weight decay differs ({listed(plan.names, quoted=True)}) and has weight_decay="
                f"{effective_decay(groups[plan.index]):g}. {self._fix()}"
            )
        if not bases:
            return
        first, base = bases[0]
        for plan, other in bases[1:]:
            if not math.isclose(other, base, rel_tol=1e-6, abs_tol=1e-12):
                rows = ", ".join(
                    f"`{group_name(groups[p.index], p.index)}` {effective_decay(groups[p.index]):g} (x{p.multiplier:g})"
                    for p, _ in bases[:6]
                )
                raise ValueError(
                    f"The decayed param groups of `{label}` no longer share one base weight decay: {rows}; expected"
                    f" every group at base x its multiplier (`{group_name(groups[first.index], first.index)}` gives"
                    f" base {base:g}, `{group_name(groups[plan.index], plan.index)}` {other:g}). Scale all decayed"
                    f" groups together (`weight_decay = base * weight_decay_multiplier`, hooked groups through"
                    f" `{HOOK_WEIGHT_DECAY}`), or opt out if you manage weight decay yourself. {self._fix()}"
                )

    def _fix(self) -> str:
        return (
            f"The groups were changed after they were built, {self._culprit}. Build them from the decisions"
            " (`param_groups`, `NoDecayMixin.configure_param_groups`, the `NoDecay*Finetuning` callbacks), which"
            " give every multiplier its own group, or set `check_weight_decay = False` on the `NoDecayMixin`"
            " module if you manage weight decay yourself."
        )


def _fingerprint(groups: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    return tuple((id(g), id(g[PARAMS]), len(g[PARAMS])) for g in groups)


def _one_per_kind(decided: Sequence[DecayDecision]) -> list[DecayDecision]:
    seen: dict[str, DecayDecision] = {}
    for decision in decided:
        seen.setdefault(decided_group_name(decision.multiplier, decision.penalty, toward=decision.toward), decision)
    return list(seen.values())


def _one_per_lr(decided: Sequence[DecayDecision]) -> list[DecayDecision]:
    seen: dict[float, DecayDecision] = {}
    for decision in decided:
        seen.setdefault(decision.lr_multiplier, decision)
    return list(seen.values())


def _own_decay(optimizer: Optimizer, group: Mapping[str, Any]) -> float:
    """The largest decay-like option the optimizer applies on its own (ASGD's ``lambd``), else 0."""
    return max((float(group.get(key, 0.0) or 0.0) for key in own_decay_keys(optimizer)), default=0.0)
