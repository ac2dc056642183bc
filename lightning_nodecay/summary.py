"""What went where and why: a printable summary of weight-decay decisions. Pure PyTorch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_nodecay._hook_checks import Masks
from lightning_nodecay._naming import listed
from lightning_nodecay._schema import NAME, PARAMS, PENALTY, WEIGHT_DECAY_MULTIPLIER
from lightning_nodecay.groups import DecayDecision, groups_from_decisions


@dataclass(frozen=True)
class GroupSummary:
    """Size of one param group.

    Attributes:
        name: group name (``decay``, ``no_decay``, ``decay_x2``, ...).
        multiplier: factor of the optimizer's base ``weight_decay``.
        tensors: number of parameter tensors.
        elements: number of scalar weights (full size, also for DeepSpeed ZeRO-3 parameters).
        penalty: ``"l2"`` or ``"l1"``.
        mask_share: share of the elements that belong to parameters with a per-element mask.
        effective_multiplier: element-weighted mean multiplier of the group, masks included.

    Example:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> [(g.name, g.multiplier, g.tensors, g.elements) for g in summarize(decide(nn.Linear(4, 2))).groups]
        [('decay', 1.0, 1, 8), ('no_decay', 0.0, 1, 2)]
    """

    name: str
    multiplier: float
    tensors: int
    elements: int
    penalty: str = "l2"
    mask_share: float = 0.0
    effective_multiplier: float | None = None


@dataclass(frozen=True)
class DecaySummary:
    """Groups and the rule behind every parameter that is not decayed at the base rate.

    Attributes:
        groups: one entry per param group, in group order.
        reasons: ``{reason: [parameter names]}`` for every rule that fired (``default`` left out).

    Example:
        >>> from torch import nn
        >>> from lightning_nodecay.groups import decide
        >>> summarize(decide(nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))).reasons
        {'name pattern `bias`': ['0.bias'], 'module type `LayerNorm`': ['1.weight', '1.bias']}
    """

    groups: list[GroupSummary]
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        """Render as a table, like Lightning's ``ModelSummary``."""
        masked = any(g.mask_share for g in self.groups)
        rows = [("", "Group", "Decay", "Tensors", "Elements") + (("Masked",) if masked else ())]
        for i, g in enumerate(self.groups):
            decay = f"x{g.multiplier:g}" if g.effective_multiplier is None else f"x{g.effective_multiplier:.3g}"
            decay += " L1" if g.penalty == "l1" else ""
            share = (f"{g.mask_share:.0%}" if g.mask_share else "",) if masked else ()
            rows.append((str(i), g.name, decay, str(g.tensors), _human(g.elements), *share))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(" |") for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        for reason, names in self.reasons.items():
            lines.append(f"{reason}: {len(names)} tensor{'s' * (len(names) != 1)} ({listed(names)})")
        return "\n".join(lines)


def summarize(decisions: Iterable[DecayDecision], masks: Masks | None = None) -> DecaySummary:
    """Summarize decisions made by :func:`~lightning_nodecay.groups.decide`.

    Args:
        decisions: the decisions.
        masks: per-element masks, ``{parameter name or parameter: mask}``; they add a ``Masked``
            column (share of the group's elements under a mask) and make ``Decay`` the group's
            element-weighted mean multiplier.

    Example:
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
    groups = [_group_summary(g, mask_means) for g in groups_from_decisions(decisions)]
    reasons: dict[str, list[str]] = {}
    for d in decisions:
        if d.reason != "default":
            reasons.setdefault(d.reason, []).append(d.name)
    for d in decisions:
        if id(d.param) in mask_means:
            reasons.setdefault("per-element mask", []).append(d.name)
    return DecaySummary(groups, reasons)


def _group_summary(group: Mapping, mask_means: Mapping[int, float]) -> GroupSummary:
    sizes = [_numel(p) for p in group[PARAMS]]
    elements, multiplier = sum(sizes), group[WEIGHT_DECAY_MULTIPLIER]
    masked = sum(n for p, n in zip(group[PARAMS], sizes, strict=True) if id(p) in mask_means)
    if not masked:
        return GroupSummary(group[NAME], multiplier, len(sizes), elements, group.get(PENALTY, "l2"))
    weighted = sum(n * mask_means.get(id(p), 1.0) for p, n in zip(group[PARAMS], sizes, strict=True))
    return GroupSummary(
        group[NAME],
        multiplier,
        len(sizes),
        elements,
        group.get(PENALTY, "l2"),
        mask_share=masked / elements,
        effective_multiplier=multiplier * weighted / elements,
    )


def _numel(param: nn.Parameter) -> int:
    """Full size of a parameter, also when DeepSpeed ZeRO-3 has emptied it (``ds_numel``)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
