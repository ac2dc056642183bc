"""Move saved optimizer and LR-scheduler state to changed param groups, by parameter name. Pure PyTorch.

Given the :class:`~lightning_nodecay._layout.Layout` a state was saved with and the current one, every
parameter's state (``exp_avg``, ``step``, momentum buffers, ...) follows it by name; each current group
continues the hyperparameters of its *source* group; per-group lists of LR schedulers are rewritten the
same way. Parameters without saved state start fresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_nodecay._layout import Layout
from lightning_nodecay._schema import DECISION_KEYS, INITIAL_LR, LR, LR_MULTIPLIER, NAME, PARAMS, PER_PARAMETER_STATES

#: Per-group lists of LR schedulers that hold learning rates (scaled with a group's learning-rate multiplier).
LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
#: Attributes of ``torch.optim.lr_scheduler`` schedulers, and keys of their ``state_dict()``, that hold one entry
#: per param group.
_PER_GROUP_KEYS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")
#: What a resume can do instead, for the messages that refuse one.
WEIGHTS_ONLY = (
    "resume the weights only (`Model.load_from_checkpoint(path)`, then `trainer.fit(model)` without `ckpt_path`;"
    " the optimizer starts fresh)."
)


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

    The per-parameter state (``exp_avg``, ``step``, momentum buffers, ...) and the hook's masks and references
    follow each parameter by name; parameters without saved state start fresh. Each group's hyperparameters (``lr``,
    ``betas``, ...) come from its source group (see :func:`source_groups`), keeping what an LR
    schedule did to them; every group keeps its own decision keys (``weight_decay``, its multiplier,
    the hook's decay, the penalty: the current code decides decay, see :func:`with_current_decisions`).
    Groups without a source keep their current hyperparameters.

    Args:
        state_dict: ``optimizer.state_dict()`` of the saving run.
        saved: the layout the state was saved with.
        current: the layout of the optimizer that will load the result.
        current_groups: ``optimizer.param_groups`` of that optimizer.

    Returns:
        A state dict that ``optimizer.load_state_dict`` accepts for ``current``.

    Examples:
        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
        >>> before = torch.optim.SGD([w, b], lr=0.1, momentum=0.9)
        >>> w.grad, b.grad = torch.ones(2), 2 * torch.ones(2)
        >>> before.step()
        >>> after = torch.optim.SGD([{"params": [b], "name": "b"}, {"params": [w], "name": "w"}], lr=0.1, momentum=0.9)
        >>> from lightning_nodecay._layout import GroupLayout
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
        for name, pid in zip(g.params, sg[PARAMS], strict=True)
    }
    sources = source_groups(saved, current)
    moved = {"state": state_dict["state"]} | {k: state_dict[k] for k in PER_PARAMETER_STATES if k in state_dict}
    remapped: dict[str, dict[int, Any]] = {key: {} for key in moved}
    groups = []
    index = 0
    for layout, group, source in zip(current.groups, current_groups, sources, strict=True):
        source_group = saved_groups[source] if source is not None else None
        hyper = _hyperparameters(group, source_group)
        ids = []
        for name in layout.params:
            pid = saved_ids.get(name)
            for key, per_parameter in moved.items():
                if pid is not None and pid in per_parameter:
                    remapped[key][index] = per_parameter[pid]
            ids.append(index)
            index += 1
        groups.append({**hyper, PARAMS: ids})
    return {**state_dict, **remapped, "param_groups": groups}


def _check_matches_state(saved: Layout, saved_groups: Sequence[Mapping[str, Any]]) -> None:
    if [len(g.params) for g in saved.groups] != [len(g[PARAMS]) for g in saved_groups]:
        raise ValueError(
            "The checkpoint's saved layout does not match its optimizer state (different group sizes): the"
            " checkpoint was edited or is corrupt. Resume from another checkpoint, or " + WEIGHTS_ONLY
        )


def with_current_decisions(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A saved param group with the decision keys of the current one: the current rules decide weight decay.

    The optimizer's trajectory (``lr``, ``betas``, ...) stays as saved; ``weight_decay``, its multiplier, the hook's
    decay, the penalty and the mask share become those of ``current``, and decision keys it lacks are dropped.

    A changed learning-rate multiplier (another ``layer_decay`` or ``lr_multipliers``) rescales the saved ``lr``
    and ``initial_lr``: the schedule's position stays, the ratio becomes the current one (:func:`lr_scale`).

    Examples:
        >>> saved = {"lr": 0.5, "weight_decay": 0.0, "hook_weight_decay": 0.2}
        >>> with_current_decisions(saved, {"lr": 1.0, "weight_decay": 0.1})
        {'lr': 0.5, 'weight_decay': 0.1}
        >>> with_current_decisions({"lr": 0.5, "lr_multiplier": 0.5}, {"lr": 1.0, "lr_multiplier": 0.25})
        {'lr': 0.25, 'lr_multiplier': 0.25}
    """
    scale = lr_scale(saved, current)
    kept = {key: value for key, value in saved.items() if key not in DECISION_KEYS}
    for key in (LR, INITIAL_LR):
        if key in kept and scale != 1:
            kept[key] *= scale
    return {**kept, **{key: current[key] for key in DECISION_KEYS if key in current}}


def lr_scale(saved: Mapping[str, Any], current: Mapping[str, Any]) -> float:
    """How much the current rules change a saved group's learning rate: current over saved ``lr_multiplier``."""
    return float(current.get(LR_MULTIPLIER, 1.0)) / float(saved.get(LR_MULTIPLIER, 1.0))


def scale_scheduler_state(state: Mapping[str, Any], scales: Sequence[float]) -> dict[str, Any]:
    """An LR scheduler's ``state_dict`` with the learning rates it keeps per group scaled by ``scales`` (nested too).

    Examples:
        >>> scale_scheduler_state({"base_lrs": [0.1, 0.2], "_last_lr": [0.1, 0.2], "last_epoch": 3}, [1.0, 0.5])
        {'base_lrs': [0.1, 0.1], '_last_lr': [0.1, 0.1], 'last_epoch': 3}
    """
    out = dict(state)
    for key, values in per_group_lists(state, len(scales)).items():
        if key in LR_LISTS:
            out[key] = [value * scale for value, scale in zip(values, scales, strict=True)]
    nested = state.get("_schedulers")
    if isinstance(nested, list):
        out["_schedulers"] = [scale_scheduler_state(s, scales) for s in nested]
    return out


def _hyperparameters(current: Mapping[str, Any], source: Mapping[str, Any] | None) -> dict[str, Any]:
    """Hyperparameters of a remapped group: its source's, except the decision keys and the name (the current's)."""
    hyper = with_current_decisions(current if source is None else source, current)
    for key in (PARAMS, "param_names", NAME):
        hyper.pop(key, None)
    for key in (NAME, "param_names"):
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

    Examples:
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

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": 0.5}], lr=1)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        >>> per_group_lists(scheduler.state_dict(), 2)
        {'base_lrs': [1, 0.5], '_last_lr': [1, 0.5]}
    """
    found = {key: scheduler_state.get(key) for key in _PER_GROUP_KEYS}
    return {key: values for key, values in found.items() if isinstance(values, list) and len(values) == groups}
