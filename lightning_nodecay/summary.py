"""What went where and why: a printable summary of weight-decay decisions. Pure PyTorch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from lightning_nodecay.groups import DecayDecision, groups_from_decisions

_SHOWN_NAMES = 4


@dataclass(frozen=True)
class GroupSummary:
    """Size of one param group.

    Attributes:
        name: group name (``decay``, ``no_decay``, ``decay_x2``, ...).
        multiplier: factor of the optimizer's base ``weight_decay``.
        tensors: number of parameter tensors.
        elements: number of scalar weights (full size, also for DeepSpeed ZeRO-3 parameters).
    """

    name: str
    multiplier: float
    tensors: int
    elements: int


@dataclass(frozen=True)
class DecaySummary:
    """Groups and the rule behind every parameter that is not decayed at the base rate.

    Attributes:
        groups: one entry per param group, in group order.
        reasons: ``{reason: [parameter names]}`` for every rule that fired (``default`` left out).
    """

    groups: list[GroupSummary]
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        """Render as a table, like Lightning's ``ModelSummary``."""
        rows = [("", "Group", "Decay", "Tensors", "Elements")]
        for i, g in enumerate(self.groups):
            rows.append((str(i), g.name, f"x{g.multiplier:g}", str(g.tensors), _human(g.elements)))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        for reason, names in self.reasons.items():
            shown = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
            lines.append(f"{reason}: {len(names)} tensor{'s' * (len(names) != 1)} ({shown})")
        return "\n".join(lines)


def summarize(decisions: Iterable[DecayDecision]) -> DecaySummary:
    """Summarize decisions made by :func:`~lightning_nodecay.groups.decide`.

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
    """
    decisions = list(decisions)
    groups = [
        GroupSummary(g["name"], g["weight_decay_multiplier"], len(g["params"]), sum(_numel(p) for p in g["params"]))
        for g in groups_from_decisions(decisions)
    ]
    reasons: dict[str, list[str]] = {}
    for d in decisions:
        if d.reason != "default":
            reasons.setdefault(d.reason, []).append(d.name)
    return DecaySummary(groups, reasons)


def _numel(param: nn.Parameter) -> int:
    """Full size of a parameter, also when DeepSpeed ZeRO-3 has emptied it (``ds_numel``)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
