"""Lightning checkpoints and param-group layouts: record them at save, check (and remap) them at resume.

Glue over the pure :mod:`~lightning_nodecay._layout` and :mod:`~lightning_nodecay._remap`: it reads and
rewrites Lightning's checkpoint dict (``optimizer_states``, ``lr_schedulers``) and adds the library's
``lightning_nodecay_layouts`` key. Same layout on resume: nothing to do. Different layout: the saved state
of every parameter moves to its new position by name (new parameters start fresh, dropped ones are
reported), or a :class:`~lightning_nodecay.LayoutMismatchError` lists the differences. Never silent.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from torch import nn

from lightning_nodecay._invariant import effective_decay
from lightning_nodecay._layout import Layout, LayoutDiff, LayoutMismatchError, compare_layouts, layout_of
from lightning_nodecay._naming import group_name
from lightning_nodecay._remap import (
    WEIGHTS_ONLY,
    lr_scale,
    remap_optimizer_state,
    remap_scheduler_state,
    scale_scheduler_state,
    source_groups,
    with_current_decisions,
)
from lightning_nodecay._schema import LAYOUTS, LR_SCHEDULERS, MASKS_STATE, OPTIMIZER_STATES, PARAMS, REFERENCES_STATE
from lightning_nodecay.hook import WeightDecayHook

#: The key of an optimizer ``state_dict`` (torch's own) that holds the param groups.
_PARAM_GROUPS = "param_groups"

#: What to do when resuming with param groups that differ from the checkpoint's.
LayoutPolicy = Literal["remap", "error"]


def save_layouts(checkpoint: dict[str, Any], optimizers: Sequence[Any], module: nn.Module) -> None:
    """Store the layout of every optimizer in ``checkpoint`` (Lightning's checkpoint dict)."""
    checkpoint[LAYOUTS] = [layout_of(o.param_groups, module).to_state() for o in optimizers]


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
    states = checkpoint.get(OPTIMIZER_STATES)
    if not states:
        return []
    currents = [layout_of(o.param_groups, module) for o in optimizers]
    if len(states) != len(currents):
        raise LayoutMismatchError(
            f"The checkpoint holds state for {len(states)} optimizer(s), `configure_optimizers` now builds"
            f" {len(currents)}. Restore the previous optimizers, or {WEIGHTS_ONLY}"
        )
    if LAYOUTS not in checkpoint:
        _check_unlabelled(states, optimizers, currents)
        scales = [_lr_scales(state, optimizer, None) for state, optimizer in zip(states, optimizers, strict=True)]
        _rescale_schedulers(checkpoint, optimizers, schedulers, scales)
        return _restore_decisions(states, optimizers)
    saved = [Layout.from_state(s) for s in checkpoint[LAYOUTS]]
    diffs = [compare_layouts(s, c) for s, c in zip(saved, currents, strict=True)]
    if any(diffs) and (on_layout_change == "error" or not restorable):
        raise LayoutMismatchError(_mismatch_message(diffs, restorable))
    sources = [source_groups(d.saved, d.current) if d else None for d in diffs]
    scales = [_lr_scales(s, o, src) for s, o, src in zip(states, optimizers, sources, strict=True)]
    messages = _remap_changed(checkpoint, optimizers, diffs, schedulers)
    _rescale_schedulers(checkpoint, optimizers, schedulers, scales)
    return messages + _restore_decisions(states, optimizers)


def _lr_scales(state: Mapping[str, Any], optimizer: Any, sources: Sequence[int | None] | None) -> list[float]:
    """Per current group, how much its lr multiplier changed from the saved group it continues (``sources``)."""
    saved = state[_PARAM_GROUPS]
    origins = sources if sources is not None else range(len(saved))
    return [
        lr_scale(saved[origin], current) if origin is not None else 1.0
        for current, origin in zip(optimizer.param_groups, origins, strict=False)
    ]


def _rescale_schedulers(
    checkpoint: dict[str, Any], optimizers: Sequence[Any], schedulers: Sequence[Any], scales: list[list[float]]
) -> None:
    """Scale the saved schedulers' per-group learning rates (in the current groups' order) by ``scales``."""
    states = checkpoint.get(LR_SCHEDULERS) or []
    for optimizer, optimizer_scales in zip(optimizers, scales, strict=True):
        if all(scale == 1 for scale in optimizer_scales):
            continue
        for j, (scheduler, scheduler_state) in enumerate(zip(schedulers, states, strict=False)):
            if getattr(scheduler, "optimizer", None) is optimizer:
                states[j] = scale_scheduler_state(scheduler_state, optimizer_scales)


def _remap_changed(
    checkpoint: dict[str, Any], optimizers: Sequence[Any], diffs: Sequence[LayoutDiff], schedulers: Sequence[Any]
) -> list[str]:
    """Remap, by parameter name, the saved state of every optimizer whose layout changed."""
    states = checkpoint[OPTIMIZER_STATES]
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


def _restore_decisions(states: list[dict[str, Any]], optimizers: Sequence[Any]) -> list[str]:
    """Give every saved group the decision keys of its current group (same positions by now), saying what changed.

    The current rules and optimizer decide weight decay: a checkpoint of a run with masks, L1 or another
    ``weight_decay`` must not bring back its own decay (see ``_remap.with_current_decisions``).
    """
    messages = []
    for state, optimizer in zip(states, optimizers, strict=True):
        label = type(optimizer).__name__
        saved_groups = state[_PARAM_GROUPS]
        for index, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups, strict=True)):
            before, after = effective_decay(saved), effective_decay(current)
            if before != after:
                name = group_name(current, index)
                messages.append(
                    f"{label} group `{name}`: weight decay {before:g} in the checkpoint, {after:g} from the current"
                    " rules and optimizer, which decide it"
                )
            saved_groups[index] = with_current_decisions(saved, current)
        for key, what in ((MASKS_STATE, "masks"), (REFERENCES_STATE, "references")):
            if state.get(key) and WeightDecayHook.of(optimizer) is None:
                state.pop(key)
                messages.append(
                    f"{label}: the checkpoint's weight-decay {what} are not used: the current rules declare none"
                )
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
    states = checkpoint.get(LR_SCHEDULERS) or []
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
        " name, restore the previous exclusions, or " + WEIGHTS_ONLY
        if restorable
        else "This strategy restores optimizer state itself, so it cannot be remapped by name. Restore the previous"
        " exclusions, or " + WEIGHTS_ONLY
    )
    return (
        "The param groups differ from the checkpoint's, so PyTorch would restore optimizer state onto the wrong"
        " parameters:\n" + "\n".join(details) + "\n" + fix
    )


def _check_unlabelled(states: Sequence[Mapping[str, Any]], optimizers: Sequence[Any], currents: list[Layout]) -> None:
    for state, optimizer, current in zip(states, optimizers, currents, strict=True):
        saved_sizes = [len(g[PARAMS]) for g in state[_PARAM_GROUPS]]
        sizes = [len(g.params) for g in current.groups]
        if saved_sizes != sizes:
            now = ", ".join(f"`{g.name}` ({len(g.params)})" for g in current.groups)
            raise LayoutMismatchError(
                f"The checkpoint was saved without `NoDecayMixin`, so its optimizer state has no parameter names: its"
                f" `{type(optimizer).__name__}` groups hold {saved_sizes} parameters, the current groups {now}, and"
                " the state cannot be matched to parameters. To move a run to `NoDecayMixin`, " + WEIGHTS_ONLY
            )
    warnings.warn(
        "The checkpoint has no param-group layout (it was saved without `NoDecayMixin`), so its optimizer state is"
        " restored by position, as PyTorch does. That is right only if the groups hold the same parameters in the"
        " same order as when it was saved. Checkpoints saved from now on record the layout.",
        UserWarning,
        stacklevel=2,
    )
