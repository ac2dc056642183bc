"""The param-group layout of an optimizer: group names and parameter names, in order. Pure PyTorch.

PyTorch restores optimizer state *by position*: the i-th parameter of the saved state goes to the
i-th parameter of the current optimizer, and only group sizes are checked. If the grouping changed
between saving and resuming (a new exclusion pattern, an upgrade, an unfrozen layer), Adam's moments
silently land on the wrong tensors. A :class:`Layout` records, per group, its name and the cleaned
names of its parameters in order, so a checkpoint can say what each position meant, and
:func:`compare_layouts` says what changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_nodecay._naming import group_name, param_names
from lightning_nodecay._schema import NAME, PARAMS


class LayoutMismatchError(RuntimeError):
    """The optimizer's param groups differ from the checkpoint's, and the state cannot be moved safely.

    Raised on resume when ``on_layout_change="error"``, or when the state cannot be remapped by name.
    """


@dataclass(frozen=True)
class GroupLayout:
    """One param group: its name and the cleaned names of its parameters, in order.

    Examples:
        >>> group = GroupLayout("no_decay", ("0.bias", "1.weight"))
        >>> group.name, group.params
        ('no_decay', ('0.bias', '1.weight'))
    """

    name: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """The param groups of one optimizer: group names and parameter names, in order.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay import param_groups
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> optimizer = torch.optim.AdamW(param_groups(net))
        >>> print(layout_of(optimizer.param_groups, net))
        decay: 0.weight
        no_decay: 0.bias, 1.weight, 1.bias
    """

    groups: tuple[GroupLayout, ...]

    def to_state(self) -> list[dict[str, Any]]:
        """Plain lists and strings, safe for ``torch.load(weights_only=True)``."""
        return [{NAME: g.name, PARAMS: list(g.params)} for g in self.groups]

    @classmethod
    def from_state(cls, state: Iterable[Mapping[str, Any]]) -> Layout:
        """Rebuild a layout saved with :meth:`to_state`."""
        return cls(tuple(GroupLayout(str(g[NAME]), tuple(g[PARAMS])) for g in state))

    def __str__(self) -> str:
        return "\n".join(f"{g.name}: {', '.join(g.params)}" for g in self.groups)


def layout_of(groups: Sequence[Mapping[str, Any]], module: nn.Module) -> Layout:
    """The layout of param ``groups`` (``optimizer.param_groups``) over the parameters of ``module``.

    Groups without a ``"name"`` are called ``pg1``, ``pg2``, ... by position (see ``_naming.group_name``). A
    parameter that is not part of ``module`` is called ``?<group>[<index>]``.

    Raises:
        ValueError: a parameter appears twice (it would be updated twice per step).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> optimizer = torch.optim.SGD([{"params": [net.weight]}, {"params": [net.bias], "name": "biases"}], lr=0.1)
        >>> layout_of(optimizer.param_groups, net).groups
        (GroupLayout(name='pg1', params=('weight',)), GroupLayout(name='biases', params=('bias',)))
    """
    names = param_names(module)
    seen: dict[int, str] = {}
    layout = []
    for i, group in enumerate(groups):
        label = group_name(group, i)
        params = []
        for j, param in enumerate(group[PARAMS]):
            name = names.get(id(param), f"?{label}[{j}]")
            if id(param) in seen:
                raise ValueError(
                    f"The optimizer holds parameter `{name}` twice (in group `{seen[id(param)]}` and in group"
                    f" `{label}`), so it would be updated twice per step. Give every parameter once: build"
                    " the optimizer from `self.parameters()` (not from `self.modules()`, which repeats nested"
                    " parameters), or let `NoDecayMixin.configure_optimizers` build it."
                )
            seen[id(param)] = label
            params.append(name)
        layout.append(GroupLayout(label, tuple(params)))
    return Layout(tuple(layout))


@dataclass(frozen=True)
class LayoutDiff:
    """What changed between a saved and a current layout.

    Attributes:
        saved: the layout of the checkpoint.
        current: the layout of the optimizer now.
        moved: ``(parameter, saved group, current group)`` for every parameter that changed group.
        added: ``(parameter, current group)`` for parameters the checkpoint has no state for.
        dropped: ``(parameter, saved group)`` for parameters no current group holds.

    Examples:
        >>> diff = compare_layouts(Layout((GroupLayout("decay", ("w", "b")),)), Layout((GroupLayout("decay", ("w",)),)))
        >>> bool(diff), diff.dropped
        (True, (('b', 'decay'),))
    """

    saved: Layout
    current: Layout
    moved: tuple[tuple[str, str, str], ...]
    added: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]

    def __bool__(self) -> bool:
        return self.saved != self.current

    def lines(self) -> list[str]:
        """One human-readable line per difference (empty when the layouts are equal)."""
        if not self:
            return []
        lines = []
        saved_names = [g.name for g in self.saved.groups]
        current_names = [g.name for g in self.current.groups]
        if saved_names != current_names:
            lines.append(f"groups {_names(saved_names)} -> {_names(current_names)}")
        lines += [f"`{p}`: `{a}` -> `{b}`" for p, a, b in self.moved]
        lines += [f"`{p}`: new in `{g}`, starts with fresh state" for p, g in self.added]
        lines += [f"`{p}`: no longer in any group (was in `{g}`), its state is dropped" for p, g in self.dropped]
        saved_groups = {g.name: g.params for g in self.saved.groups}
        for group in self.current.groups:
            before = saved_groups.get(group.name)
            if before is not None and before != group.params and set(before) == set(group.params):
                lines.append(f"order of the parameters in `{group.name}` changed")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def compare_layouts(saved: Layout, current: Layout) -> LayoutDiff:
    """What moved, was added or was dropped between ``saved`` and ``current``.

    Examples:
        >>> saved = Layout((GroupLayout("decay", ("w", "b")),))
        >>> current = Layout((GroupLayout("decay", ("w",)), GroupLayout("no_decay", ("b", "new"))))
        >>> print(compare_layouts(saved, current))
        groups `decay` -> `decay`, `no_decay`
        `b`: `decay` -> `no_decay`
        `new`: new in `no_decay`, starts with fresh state
    """
    before, after = _group_of(saved), _group_of(current)
    moved = tuple((p, before[p], g) for p, g in after.items() if p in before and before[p] != g)
    added = tuple((p, g) for p, g in after.items() if p not in before)
    dropped = tuple((p, g) for p, g in before.items() if p not in after)
    return LayoutDiff(saved, current, moved, added, dropped)


def _group_of(layout: Layout) -> dict[str, str]:
    return {p: g.name for g in layout.groups for p in g.params}


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) or "(none)"
