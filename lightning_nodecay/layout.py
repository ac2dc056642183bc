"""The param-group layout of an optimizer, and safe resume when it changed. Pure PyTorch.

PyTorch restores optimizer state *by position*: the i-th parameter of the saved state goes to the
i-th parameter of the current optimizer, and only group sizes are checked. If the grouping changed
between saving and resuming (a new exclusion pattern, an upgrade, an unfrozen layer), Adam's moments
silently land on the wrong tensors. A :class:`Layout` records, per group, its name and the cleaned
names of its parameters in order, so a checkpoint can say what each position meant.

On resume, :func:`resume_layouts` compares the saved layout with the current one. Same layout:
nothing to do. Different layout: either :func:`remap_optimizer_state` moves the saved state of
every parameter to its new position by name (new parameters start fresh, dropped ones are
reported), or a :class:`LayoutMismatchError` lists the differences. Never silent.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

from lightning_nodecay.rules import clean_name

#: Checkpoint key under which :func:`save_layouts` stores one layout per optimizer.
LAYOUT_KEY = "lightning_nodecay_layouts"

LayoutPolicy = Literal["remap", "error"]

#: Keys of a param group that belong to the current code's weight-decay decision, not to the
#: optimizer's trajectory: a group built from other groups' state keeps its own values of these.
_DECAY_KEYS = ("weight_decay", "weight_decay_multiplier")


#: Attributes of ``torch.optim.lr_scheduler`` schedulers, and keys of their ``state_dict()``, that hold one entry
#: per param group.
_PER_GROUP_KEYS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")

_WEIGHTS_ONLY = (
    "resume the weights only (`Model.load_from_checkpoint(path)`, then `trainer.fit(model)` without `ckpt_path`;"
    " the optimizer starts fresh)."
)


class LayoutMismatchError(RuntimeError):
    """The optimizer's param groups differ from the checkpoint's, and the state cannot be moved safely.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> before = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> checkpoint = {"optimizer_states": [before.state_dict()]}
        >>> save_layouts(checkpoint, [before], net)
        >>> after = torch.optim.SGD([{"params": [net.bias]}, {"params": [net.weight]}], lr=0.1)
        >>> resume_layouts(checkpoint, [after], net, on_layout_change="error")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_nodecay.layout.LayoutMismatchError: The param groups differ from the checkpoint's, ...
    """


@dataclass(frozen=True)
class GroupLayout:
    """One param group: its name and the cleaned names of its parameters, in order.

    Example:
        >>> group = GroupLayout("no_decay", ("0.bias", "1.weight"))
        >>> group.name, group.params
        ('no_decay', ('0.bias', '1.weight'))
    """

    name: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """The param groups of one optimizer: group names and parameter names, in order.

    Example:
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
        return [{"name": g.name, "params": list(g.params)} for g in self.groups]

    @classmethod
    def from_state(cls, state: Iterable[Mapping[str, Any]]) -> Layout:
        """Rebuild a layout saved with :meth:`to_state`."""
        return cls(tuple(GroupLayout(str(g["name"]), tuple(g["params"])) for g in state))

    def __str__(self) -> str:
        return "\n".join(f"{g.name}: {', '.join(g.params)}" for g in self.groups)


def param_names(module: nn.Module) -> dict[int, str]:
    """``{id(parameter): name}`` of the parameters of ``module``: qualified names without wrapper segments.

    Names are cleaned as :func:`~lightning_nodecay.clean_name` cleans them; a parameter reached through several
    paths is named by the first. Pass ``module`` unwrapped (not DDP's wrapper) for the names of
    :func:`~lightning_nodecay.decide`.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> param_names(net)[id(net[0].bias)]
        '0.bias'
    """
    return {id(p): clean_name(n) for n, p in module.named_parameters()}


def group_label(group: Mapping[str, Any], index: int) -> str:
    """The name of the param group at position ``index`` (from 0): its ``"name"``, else ``pg{index + 1}``.

    Unnamed groups are numbered from 1, as Lightning's ``LearningRateMonitor`` names them (``lr-SGD/pg1``), so
    a group has the same name in logged keys, checkpoint layouts and messages.

    Example:
        >>> group_label({"params": []}, 0), group_label({"name": "no_decay", "params": []}, 1)
        ('pg1', 'no_decay')
    """
    return str(group.get("name", f"pg{index + 1}"))


def layout_of(groups: Sequence[Mapping[str, Any]], module: nn.Module) -> Layout:
    """The layout of param ``groups`` (``optimizer.param_groups``) over the parameters of ``module``.

    Groups without a ``"name"`` are called ``pg1``, ``pg2``, ... by position (see :func:`group_label`). A
    parameter that is not part of ``module`` is called ``?<group>[<index>]``.

    Raises:
        ValueError: a parameter appears twice (it would be updated twice per step).

    Example:
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
        group_name = group_label(group, i)
        params = []
        for j, param in enumerate(group["params"]):
            name = names.get(id(param), f"?{group_name}[{j}]")
            if id(param) in seen:
                raise ValueError(
                    f"The optimizer holds parameter `{name}` twice (in group `{seen[id(param)]}` and in group"
                    f" `{group_name}`), so it would be updated twice per step. Give every parameter once: build"
                    " the optimizer from `self.parameters()` (not from `self.modules()`, which repeats nested"
                    " parameters), or let `NoDecayMixin.configure_optimizers` build it."
                )
            seen[id(param)] = group_name
            params.append(name)
        layout.append(GroupLayout(group_name, tuple(params)))
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

    Example:
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

    Example:
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


def source_groups(saved: Layout, current: Layout) -> list[int | None]:
    """For each current group, the saved group whose hyperparameters and scheduler state it continues.

    A group continues the saved group of the same name; a new group continues the saved group most of
    its parameters come from (the first on ties); a group of new parameters only continues none.
    """
    saved_index = {g.name: i for i, g in enumerate(saved.groups)}
    origin = {p: i for i, g in enumerate(saved.groups) for p in g.params}
    sources: list[int | None] = []
    for group in current.groups:
        if group.name in saved_index:
            sources.append(saved_index[group.name])
            continue
        votes = Counter(origin[p] for p in group.params if p in origin)
        sources.append(min(votes, key=lambda i: (-votes[i], i)) if votes else None)
    return sources


def remap_optimizer_state(
    state_dict: Mapping[str, Any], saved: Layout, current: Layout, current_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Rewrite an optimizer ``state_dict`` saved with layout ``saved`` so it loads into ``current``.

    The per-parameter state (``exp_avg``, ``step``, momentum buffers, ...) follows each parameter by
    name; parameters without saved state start fresh. Each group's hyperparameters (``lr``,
    ``betas``, ...) come from its source group (see :func:`source_groups`), keeping what an LR
    schedule did to them; a group with a new name keeps its own ``weight_decay`` and
    ``weight_decay_multiplier`` (the current code decides decay). Groups without a source keep
    their current hyperparameters.

    Args:
        state_dict: ``optimizer.state_dict()`` of the saving run.
        saved: the layout the state was saved with.
        current: the layout of the optimizer that will load the result.
        current_groups: ``optimizer.param_groups`` of that optimizer.

    Returns:
        A state dict that ``optimizer.load_state_dict`` accepts for ``current``.

    Example:
        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
        >>> before = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
        >>> w.grad, b.grad = torch.ones(2), 2 * torch.ones(2)
        >>> before.step()
        >>> after = torch.optim.SGD([{"params": [b], "name": "b"}, {"params": [w], "name": "w"}], lr=0.1, momentum=0.9)
        >>> saved = Layout((GroupLayout("pg1", ("w", "b")),))
        >>> current = Layout((GroupLayout("b", ("b",)), GroupLayout("w", ("w",))))
        >>> after.load_state_dict(remap_optimizer_state(before.state_dict(), saved, current, after.param_groups))
        >>> after.state[b]["momentum_buffer"].tolist(), after.state[w]["momentum_buffer"].tolist()
        ([2.0, 2.0], [1.0, 1.0])
    """
    saved_groups = state_dict["param_groups"]
    _check_matches_state(saved, saved_groups)
    if len(current.groups) != len(current_groups):
        raise ValueError(
            f"`current` has {len(current.groups)} groups but `current_groups` {len(current_groups)}; pass the"
            " layout of the optimizer that will load the state: `layout_of(optimizer.param_groups, module)`."
        )
    saved_ids = {
        name: pid
        for g, sg in zip(saved.groups, saved_groups, strict=True)
        for name, pid in zip(g.params, sg["params"], strict=True)
    }
    sources = source_groups(saved, current)
    saved_names = {g.name for g in saved.groups}
    state: dict[int, Any] = {}
    groups = []
    index = 0
    for layout, group, source in zip(current.groups, current_groups, sources, strict=True):
        source_group = saved_groups[source] if source is not None else None
        hyper = _hyperparameters(group, source_group, renamed=layout.name not in saved_names)
        ids = []
        for name in layout.params:
            pid = saved_ids.get(name)
            if pid is not None and pid in state_dict["state"]:
                state[index] = state_dict["state"][pid]
            ids.append(index)
            index += 1
        groups.append({**hyper, "params": ids})
    return {**state_dict, "state": state, "param_groups": groups}


def _check_matches_state(saved: Layout, saved_groups: Sequence[Mapping[str, Any]]) -> None:
    if [len(g.params) for g in saved.groups] != [len(g["params"]) for g in saved_groups]:
        raise ValueError(
            "The checkpoint's saved layout does not match its optimizer state (different group sizes): the"
            " checkpoint was edited or is corrupt. Resume from another checkpoint, or " + _WEIGHTS_ONLY
        )


def _hyperparameters(current: Mapping[str, Any], source: Mapping[str, Any] | None, renamed: bool) -> dict[str, Any]:
    """Hyperparameters of a remapped group: its source's, except decay keys of a renamed group and its name."""
    hyper = dict(current if source is None else source)
    if source is not None and renamed:
        hyper.update({k: current[k] for k in _DECAY_KEYS if k in current})
    for key in ("params", "param_names", "name"):
        hyper.pop(key, None)
    for key in ("name", "param_names"):
        if key in current:
            hyper[key] = current[key]
    return hyper


def remap_scheduler_state(
    state: Mapping[str, Any], current_state: Mapping[str, Any], sources: Sequence[int | None], saved_groups: int
) -> dict[str, Any]:
    """Rewrite an LR scheduler's ``state_dict`` so its per-group lists follow :func:`source_groups`.

    Lists with one entry per param group (``base_lrs``, ``_last_lr``, ``min_lrs``, ...) get, for
    each current group, the saved entry of its source group, or the current scheduler's entry when
    it has none. Schedulers nested in ``SequentialLR`` / ``ChainedScheduler`` are rewritten too.

    Args:
        state: the scheduler's saved ``state_dict()``.
        current_state: ``state_dict()`` of the current scheduler (built for the current groups).
        sources: :func:`source_groups` of the saved and current layouts.
        saved_groups: number of groups of the saved layout.

    Example:
        >>> saved = {"base_lrs": [0.1, 0.2], "_last_lr": [0.05, 0.1], "last_epoch": 1}
        >>> current = {"base_lrs": [0.1, 0.1, 0.3], "_last_lr": [0.1, 0.1, 0.3], "last_epoch": 0}
        >>> remap_scheduler_state(saved, current, sources=[1, 0, None], saved_groups=2)
        {'base_lrs': [0.2, 0.1, 0.3], '_last_lr': [0.1, 0.05, 0.3], 'last_epoch': 1}
    """
    out = dict(state)
    for key, values in per_group_lists(state, saved_groups).items():
        now = current_state.get(key)
        if isinstance(now, list):
            out[key] = [values[s] if s is not None else now[k] for k, s in enumerate(sources)]
    nested, nested_now = state.get("_schedulers"), current_state.get("_schedulers")
    if isinstance(nested, list) and isinstance(nested_now, list):
        out["_schedulers"] = [
            remap_scheduler_state(s, n, sources, saved_groups) for s, n in zip(nested, nested_now, strict=True)
        ]
    return out


def per_group_lists(scheduler_state: Mapping[str, Any], groups: int) -> dict[str, list[Any]]:
    """The lists of an LR scheduler's ``state_dict()`` (or ``vars()``) that hold one entry per param group.

    Args:
        scheduler_state: the scheduler's ``state_dict()``, or ``vars(scheduler)`` to change it in place.
        groups: the number of param groups the scheduler was built for.

    Example:
        >>> import torch
        >>> optimizer = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.5}], lr=1)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        >>> per_group_lists(scheduler.state_dict(), 2)
        {'base_lrs': [1, 0.5], '_last_lr': [1, 0.5]}
    """
    found = {key: scheduler_state.get(key) for key in _PER_GROUP_KEYS}
    return {key: values for key, values in found.items() if isinstance(values, list) and len(values) == groups}


def save_layouts(checkpoint: dict[str, Any], optimizers: Sequence[Any], module: nn.Module) -> None:
    """Store the layout of every optimizer in ``checkpoint`` (Lightning's checkpoint dict)."""
    checkpoint[LAYOUT_KEY] = [layout_of(o.param_groups, module).to_state() for o in optimizers]


def resume_layouts(
    checkpoint: dict[str, Any],
    optimizers: Sequence[Any],
    module: nn.Module,
    schedulers: Sequence[Any] = (),
    *,
    on_layout_change: LayoutPolicy = "remap",
    restorable: bool = True,
) -> list[str]:
    """Check a checkpoint's layouts against ``optimizers``; remap its state in place or raise.

    Call after the optimizers have their final groups and before their state is loaded from
    ``checkpoint["optimizer_states"]`` (Lightning's format; ``checkpoint["lr_schedulers"]`` is
    rewritten too when groups are added or removed).

    Args:
        checkpoint: the checkpoint dict, modified in place.
        optimizers: the optimizers about to load ``checkpoint["optimizer_states"]``, in order.
        module: the model (parameter names).
        schedulers: the LR schedulers matching ``checkpoint["lr_schedulers"]``, in order.
        on_layout_change: ``"remap"`` moves state by parameter name; ``"error"`` raises.
        restorable: ``False`` when the optimizer state was already loaded by the strategy itself
            (FSDP, DeepSpeed), so it can no longer be remapped.

    Returns:
        Log lines describing what was remapped (empty when nothing changed).

    Raises:
        LayoutMismatchError: the layout changed and ``on_layout_change="error"`` (or the state cannot
            be remapped), or a checkpoint without layouts cannot fit the current groups.
        ValueError: ``on_layout_change`` is not one of ``"remap"``, ``"error"``.
    """
    if on_layout_change not in get_args(LayoutPolicy):
        raise ValueError(
            f"`on_layout_change` is {on_layout_change!r}; choose `'remap'` (move optimizer state by parameter"
            " name) or `'error'` (refuse to resume when the param groups changed)."
        )
    states = checkpoint.get("optimizer_states")
    if not states:
        return []
    currents = [layout_of(o.param_groups, module) for o in optimizers]
    if len(states) != len(currents):
        raise LayoutMismatchError(
            f"The checkpoint holds state for {len(states)} optimizer(s), `configure_optimizers` now builds"
            f" {len(currents)}. Restore the previous optimizers, or {_WEIGHTS_ONLY}"
        )
    if LAYOUT_KEY not in checkpoint:
        _check_unlabelled(states, optimizers, currents)
        return []
    saved = [Layout.from_state(s) for s in checkpoint[LAYOUT_KEY]]
    diffs = [compare_layouts(s, c) for s, c in zip(saved, currents, strict=True)]
    if not any(diffs):
        return []
    if on_layout_change == "error" or not restorable:
        raise LayoutMismatchError(_mismatch_message(diffs, restorable))
    messages = []
    for i, (optimizer, diff) in enumerate(zip(optimizers, diffs, strict=True)):
        if not diff:
            continue
        sources = source_groups(diff.saved, diff.current)
        states[i] = remap_optimizer_state(states[i], diff.saved, diff.current, optimizer.param_groups)
        _remap_schedulers(checkpoint, optimizer, schedulers, sources, len(diff.saved.groups))
        where = f"optimizer {i} " if len(optimizers) > 1 else ""
        lines = "\n  ".join(diff.lines() + _continuations(diff, sources))
        messages.append(f"{where}param groups changed since the checkpoint; optimizer state moved by name:\n  {lines}")
    return messages


def _continuations(diff: LayoutDiff, sources: Sequence[int | None]) -> list[str]:
    saved_names = {g.name for g in diff.saved.groups}
    return [
        f"new group `{g.name}` continues the hyperparameters of saved group `{diff.saved.groups[s].name}`"
        for g, s in zip(diff.current.groups, sources, strict=True)
        if s is not None and g.name not in saved_names
    ]


def _remap_schedulers(
    checkpoint: dict[str, Any], optimizer: Any, schedulers: Sequence[Any], sources: list[int | None], saved_groups: int
) -> None:
    states = checkpoint.get("lr_schedulers") or []
    for j, (scheduler, state) in enumerate(zip(schedulers, states, strict=False)):
        if getattr(scheduler, "optimizer", None) is optimizer:
            states[j] = remap_scheduler_state(state, scheduler.state_dict(), sources, saved_groups)


def _mismatch_message(diffs: Sequence[LayoutDiff], restorable: bool) -> str:
    details = []
    for i, diff in enumerate(diffs):
        prefix = f"optimizer {i}: " if len(diffs) > 1 else ""
        details += [f"  {prefix}{line}" for line in diff.lines()]
    fix = (
        "Set `on_layout_change = 'remap'` on the model to move each parameter's optimizer state to its new group by"
        " name, restore the previous exclusions, or " + _WEIGHTS_ONLY
        if restorable
        else "This strategy restores optimizer state itself, so it cannot be remapped by name. Restore the previous"
        " exclusions, or " + _WEIGHTS_ONLY
    )
    return (
        "The param groups differ from the checkpoint's, so PyTorch would restore optimizer state onto the wrong"
        " parameters:\n" + "\n".join(details) + "\n" + fix
    )


def _check_unlabelled(states: Sequence[Mapping[str, Any]], optimizers: Sequence[Any], currents: list[Layout]) -> None:
    for state, optimizer, current in zip(states, optimizers, currents, strict=True):
        saved_sizes = [len(g["params"]) for g in state["param_groups"]]
        sizes = [len(g.params) for g in current.groups]
        if saved_sizes != sizes:
            now = ", ".join(f"`{g.name}` ({len(g.params)})" for g in current.groups)
            raise LayoutMismatchError(
                f"The checkpoint was saved without `NoDecayMixin`, so its optimizer state has no parameter names: its"
                f" `{type(optimizer).__name__}` groups hold {saved_sizes} parameters, the current groups {now}, and"
                " the state cannot be matched to parameters. To move a run to `NoDecayMixin`, " + _WEIGHTS_ONLY
            )
    warnings.warn(
        "The checkpoint has no param-group layout (it was saved without `NoDecayMixin`), so its optimizer state is"
        " restored by position, as PyTorch does. That is right only if the groups hold the same parameters in the"
        " same order as when it was saved. Checkpoints saved from now on record the layout.",
        UserWarning,
        stacklevel=2,
    )
