"""Make exclusions hold however the optimizer was built. Pure PyTorch.

If an optimizer holds an excluded parameter in a group with non-zero weight decay (LightningCLI's
``--optimizer`` replaced ``configure_optimizers``; a user wrote ``AdamW(self.parameters())``), the
group is split in place, before any step: the excluded parameters move to a new group that copies
every hyperparameter of the old one but has ``weight_decay=0.0``. LR schedulers attached to the
optimizer learn about the new group, so it keeps following the schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch.optim import Optimizer

from lightning_nodecay._naming import group_name, listed
from lightning_nodecay._remap import per_group_lists
from lightning_nodecay._schema import NAME, PARAMS, WEIGHT_DECAY
from lightning_nodecay.groups import DECAY, NO_DECAY, DecayDecision


def split_excluded(
    optimizer: Optimizer, decisions: Iterable[DecayDecision], schedulers: Iterable[Any] = ()
) -> list[str]:
    """Move excluded parameters out of decayed groups of ``optimizer``, in place.

    Must run before the first step and before optimizer state is loaded. The new group of a group named
    ``g`` is ``g_no_decay``; unnamed groups are named ``pg1``, ``pg2``, ... by position first (see
    :func:`~lightning_nodecay.layout.group_label`), except a single unnamed group, which becomes ``decay``
    and gives ``no_decay``.

    Args:
        optimizer: the optimizer to fix.
        decisions: the decisions of :func:`~lightning_nodecay.groups.decide` for the model.
        schedulers: LR schedulers of ``optimizer``; their per-group lists get an entry for each new
            group.

    Returns:
        One message per group that was split (empty when nothing had to change).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> net = nn.Linear(2, 2)
        >>> optimizer = torch.optim.AdamW(net.parameters(), weight_decay=0.1)
        >>> split_excluded(optimizer, decide(net))
        ['AdamW group `pg1`: moved 1 excluded tensor (bias) to new group `no_decay` with weight_decay=0.0']
        >>> [(g["name"], g["weight_decay"]) for g in optimizer.param_groups]
        [('decay', 0.1), ('no_decay', 0.0)]
    """
    excluded = _excluded(decisions)
    messages = []
    for index, group in enumerate(list(optimizer.param_groups)):
        if not group.get(WEIGHT_DECAY):
            continue
        moving = [p for p in group[PARAMS] if id(p) in excluded]
        if not moving:
            continue
        names = listed([excluded[id(p)] for p in moving])
        plural = "s" * (len(moving) > 1)
        label = group_name(group, index)
        what = f"{type(optimizer).__name__} group `{label}`: moved {len(moving)} excluded tensor{plural} ({names})"
        if len(moving) == len(group[PARAMS]):
            group[WEIGHT_DECAY] = 0.0
            messages.append(f"{what}: the whole group, set its weight_decay=0.0")
            continue
        base = group_name(group, index) if NAME in group or len(optimizer.param_groups) > 1 else ""
        group[NAME] = base or DECAY
        group[PARAMS] = [p for p in group[PARAMS] if id(p) not in excluded]
        new_group = {**group, PARAMS: moving, WEIGHT_DECAY: 0.0, NAME: f"{base}_{NO_DECAY}" if base else NO_DECAY}
        optimizer.add_param_group(new_group)
        _extend_schedulers(optimizer, schedulers, index)
        messages.append(f"{what} to new group `{new_group[NAME]}` with weight_decay=0.0")
    return messages


def misplaced_exclusions(groups: Sequence[Mapping[str, Any]], decisions: Iterable[DecayDecision]) -> list[str]:
    """Names of excluded parameters (multiplier 0) that sit in a group with non-zero ``weight_decay``.

    Example:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> net = nn.Linear(2, 2)
        >>> misplaced_exclusions([{"params": list(net.parameters()), "weight_decay": 0.1}], decide(net))
        ['bias']
    """
    excluded = _excluded(decisions)
    return [excluded[id(p)] for g in groups if g.get(WEIGHT_DECAY) for p in g[PARAMS] if id(p) in excluded]


def _excluded(decisions: Iterable[DecayDecision]) -> dict[int, str]:
    """``{id(parameter): name}`` of the parameters excluded from weight decay."""
    return {id(d.param): d.name for d in decisions if d.multiplier == 0}


def _extend_schedulers(optimizer: Optimizer, schedulers: Iterable[Any], source: int) -> None:
    """Give the per-group lists of ``optimizer``'s schedulers (nested ones too) an entry for the group just added.

    The new group copies group ``source``; lists a nested scheduler shares with its parent grow once.
    """
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        _extend_schedulers(optimizer, getattr(scheduler, "_schedulers", ()), source)
        for values in per_group_lists(vars(scheduler), len(optimizer.param_groups) - 1).values():
            values.append(values[source])
