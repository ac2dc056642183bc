"""What went where and why: a printable summary of weight-decay decisions. Pure PyTorch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_nodecay._hook_checks import Masks
from lightning_nodecay._invariant import effective_decay
from lightning_nodecay._naming import group_name, listed
from lightning_nodecay._schema import LR, NAME, PARAMS
from lightning_nodecay.groups import DecayDecision, groups_from_decisions


@dataclass(frozen=True)
class GroupSummary:
    """Size of one param group.

    Attributes:
        name: group name (``decay``, ``no_decay``, ``decay_x2``, ...).
        multiplier: factor of the optimizer's base ``weight_decay``; ``None`` when the group holds parameters
            the rules decay differently (an optimizer's group only).
        tensors: number of parameter tensors.
        elements: number of scalar weights (full size, also for DeepSpeed ZeRO-3 parameters).
        penalty: ``"l2"`` or ``"l1"``.
        mask_share: share of the elements that belong to parameters with a per-element mask.
        effective_multiplier: element-weighted mean multiplier of the group, masks included.
        weight_decay: the group's effective weight decay (``weight_decay`` + ``hook_weight_decay``), when the
            summary describes an optimizer's groups.
        lr_multiplier: factor of the optimizer's base ``lr`` (layer decay x ``lr_multipliers``); ``None`` when
            the group holds parameters the rules give different learning rates.
        lr: the group's learning rate, when the summary describes an optimizer's groups.
        toward: ``"zero"``, or ``"initial"`` for a group decayed toward its reference (shown as ``to init``).

    Examples:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> [(g.name, g.multiplier, g.tensors, g.elements) for g in summarize(decide(nn.Linear(4, 2))).groups]
        [('decay', 1.0, 1, 8), ('no_decay', 0.0, 1, 2)]
    """

    name: str
    multiplier: float | None
    tensors: int
    elements: int
    penalty: str = "l2"
    mask_share: float = 0.0
    effective_multiplier: float | None = None
    weight_decay: float | None = None
    lr_multiplier: float | None = 1.0
    lr: float | None = None
    toward: str = "zero"


@dataclass(frozen=True)
class DecaySummary:
    """Groups and the rule behind every parameter that is not decayed at the base rate.

    Attributes:
        groups: one entry per param group, in group order.
        reasons: ``{reason: [parameter names]}`` for every rule that fired (``default`` left out).
        rules_groups: the names of the groups the rules give, when the summarized optimizer's groups differ
            from them (a custom ``configure_param_groups``, an optimizer built elsewhere); empty otherwise.

    Examples:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> summarize(decide(nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))).reasons
        {'name pattern `bias`': ['0.bias'], 'module type `LayerNorm`': ['1.weight', '1.bias']}
    """

    groups: list[GroupSummary]
    reasons: dict[str, list[str]] = field(default_factory=dict)
    rules_groups: tuple[str, ...] = ()

    def __str__(self) -> str:
        """Render as a table, like Lightning's ``ModelSummary``."""
        masked = any(g.mask_share for g in self.groups)
        valued = any(g.weight_decay is not None for g in self.groups)
        with_lr = any(g.lr_multiplier != 1 for g in self.groups)
        header = ("", "Group", "Decay") + (("Weight decay",) if valued else ())
        header += (("LR",) + (("Learning rate",) if valued else ()) if with_lr else ()) + ("Tensors", "Elements")
        rows = [header + (("Masked",) if masked else ())]
        for i, g in enumerate(self.groups):
            value = (_value(g.weight_decay),) if valued else ()
            lr = (_times(g.lr_multiplier),) + ((_value(g.lr),) if valued else ()) if with_lr else ()
            share = (f"{g.mask_share:.0%}" if g.mask_share else "",) if masked else ()
            rows.append((str(i), g.name, _decay(g), *value, *lr, str(g.tensors), _human(g.elements), *share))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(" |") for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        for reason, names in self.reasons.items():
            lines.append(f"{reason}: {len(names)} tensor{'s' * (len(names) != 1)} ({listed(names)})")
        if self.rules_groups:
            lines.append(
                f"These are the optimizer's own groups; the rules alone would give {', '.join(self.rules_groups)}."
            )
        return "\n".join(lines)


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _times(multiplier: float | None) -> str:
    return "mixed" if multiplier is None else f"x{multiplier:.4g}"


def _decay(group: GroupSummary) -> str:
    if group.multiplier is None:
        return "mixed"
    multiplier = group.multiplier if group.effective_multiplier is None else group.effective_multiplier
    forms = (" L1" if group.penalty == "l1" else "") + (" to init" if group.toward != "zero" else "")
    return f"x{multiplier:.3g}{forms}"


def summarize(
    decisions: Iterable[DecayDecision], masks: Masks | None = None, groups: Sequence[Mapping[str, Any]] | None = None
) -> DecaySummary:
    """Summarize decisions made by :func:`~lightning_nodecay.decide`, or an optimizer's groups in their light.

    Args:
        decisions: the decisions.
        masks: per-element masks, ``{parameter name or parameter: mask}``; they add a ``Masked``
            column (share of the group's elements under a mask) and make ``Decay`` the group's
            element-weighted mean multiplier.
        groups: an optimizer's ``param_groups``: then the rows are these groups as they really are, with
            their effective weight decay, and the summary says when they differ from the rules' groups.

    Examples:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> print(summarize(decide(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))))
          | Group    | Decay | Tensors | Elements
        -----------------------------------------
        0 | decay    | x1    | 1       | 16
        1 | no_decay | x0    | 3       | 12
        name pattern `bias`: 1 tensor (0.bias)
        module type `LayerNorm`: 2 tensors (1.weight, 1.bias)
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> print(summarize(decide(net), masks={"1.weight": torch.tensor([[1.0], [1.0], [0.0], [0.0]])}))
          | Group    | Decay | Tensors | Elements | Masked
        --------------------------------------------------
        0 | decay    | x0.75 | 2       | 32       | 50%
        1 | no_decay | x0    | 2       | 8
        name pattern `bias`: 2 tensors (0.bias, 1.bias)
        per-element mask: 1 tensor (1.weight)
        >>> layers = [{"params": list(m.parameters()), "name": f"layer{i}"} for i, m in enumerate(net)]
        >>> print(summarize(decide(net), groups=torch.optim.SGD(layers, lr=0.1).param_groups))
          | Group  | Decay | Weight decay | Tensors | Elements
        ------------------------------------------------------
        0 | layer0 | mixed | 0            | 2       | 20
        1 | layer1 | mixed | 0            | 2       | 20
        name pattern `bias`: 2 tensors (0.bias, 1.bias)
        These are the optimizer's own groups; the rules alone would give decay, no_decay.
    """
    decisions = list(decisions)
    by_param = {id(d.param): d for d in decisions}
    by_name = {d.name: d for d in decisions}
    mask_means: dict[int, float] = {}
    items: Iterable[tuple[object, Tensor]] = (masks or {}).items()
    for key, mask in items:
        decision = by_name.get(key) if isinstance(key, str) else by_param.get(id(key))
        if decision is not None:
            mask_means[id(decision.param)] = float(mask.double().mean())
    rules_groups = groups_from_decisions(decisions)
    shown = rules_groups if groups is None else groups
    summaries = [_group_summary(g, i, by_param, mask_means, real=groups is not None) for i, g in enumerate(shown)]
    reasons: dict[str, list[str]] = {}
    for d in decisions:
        if d.reason != "default":
            reasons.setdefault(d.reason, []).append(d.name)
    for d in decisions:
        if id(d.param) in mask_means:
            reasons.setdefault("per-element mask", []).append(d.name)
    for d in decisions:
        if d.lr_reason != "default":
            reasons.setdefault(f"lr x{d.lr_multiplier:.4g}: {d.lr_reason}", []).append(d.name)
    differ = groups is not None and _layout(groups) != _layout(rules_groups)
    return DecaySummary(summaries, reasons, tuple(g[NAME] for g in rules_groups) if differ else ())


def _layout(groups: Iterable[Mapping[str, Any]]) -> list[tuple[str | None, list[int]]]:
    return [(g.get(NAME), [id(p) for p in g[PARAMS]]) for g in groups]


def _group_summary(
    group: Mapping[str, Any], index: int, by_param: Mapping[int, DecayDecision], masks: Mapping[int, float], real: bool
) -> GroupSummary:
    params = list(group[PARAMS])
    sizes = [_numel(p) for p in params]
    elements = sum(sizes)
    decided = [d for p in params if (d := by_param.get(id(p))) is not None]
    kinds = {(d.multiplier, d.penalty, d.toward) for d in decided}
    multiplier, penalty, toward = next(iter(kinds)) if len(kinds) == 1 else (None, "l2", "zero")
    lr_multipliers = {d.lr_multiplier for d in decided}
    masked = sum(n for p, n in zip(params, sizes, strict=True) if id(p) in masks)
    weighted = sum(n * masks.get(id(p), 1.0) for p, n in zip(params, sizes, strict=True))
    return GroupSummary(
        group_name(group, index),
        multiplier,
        len(sizes),
        elements,
        penalty,
        mask_share=masked / elements if masked else 0.0,
        effective_multiplier=multiplier * weighted / elements if masked and multiplier is not None else None,
        weight_decay=effective_decay(group) if real else None,
        lr_multiplier=lr_multipliers.pop() if len(lr_multipliers) == 1 else None,
        lr=float(group[LR]) if real and LR in group else None,
        toward=toward,
    )


def _numel(param: nn.Parameter) -> int:
    """Full size of a parameter, also when DeepSpeed ZeRO-3 has emptied it (``ds_numel``)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
