"""The weight-decay step hook: masks, L1 penalties and decay toward a reference, inside ``optimizer.step()``.

Pure PyTorch. A param group gives all its tensors one weight decay. A *mask* goes finer: a tensor of
multipliers for one parameter (same shape as the parameter, or broadcastable to it, e.g. one multiplier per
output row), scaling the decay the parameter's group gives it, element by element. An *L1 group*
(``weight_decay_penalty="l1"``, built by ``weight_decay_l1`` rules) penalizes ``|p|`` instead of ``p**2``.
A group decayed *toward a reference* (``weight_decay_toward="initial"``, L2-SP: ``param_groups`` marks it with
``weight_decay_target="initial"``) penalizes the distance to the parameter's reference ``p0`` instead of to zero: its
weights when the hook took the group over (fit start, or the fine-tuning callback adding it), or an explicit
reference. No ``torch.optim`` optimizer offers any of these, so they are applied by an optimizer step pre-hook, with the
optimizer's own semantics (see the table in ``_semantics.py``: coupled or decoupled) and the group's
*current* ``lr``. With ``maximize=True`` the coupled term is subtracted, as the optimizer negates the
gradient before adding its decay.

A group holding a masked parameter, asking for L1 or decayed toward a reference is *hooked*: its
``weight_decay`` moves to the key ``hook_weight_decay`` (the optimizer itself then sees ``weight_decay=0.0``)
and the hook applies it to every parameter of the group (unmasked ones with multiplier 1). Hooked groups with
masks also carry ``weight_decay_mask_share``, the share of their elements under a mask. Group layout, names and LR
schedulers are untouched.

The hook runs after the gradients are final and before the update: when ``step`` gets a closure
(Lightning's default), the decay runs right after the closure, i.e. after backward, gradient accumulation
and gradient clipping, as the optimizer's own decay would; when ``step`` is called without one (AMP's
``GradScaler``), it runs before the update. A step that ``GradScaler`` skips never calls
``optimizer.step``, so it applies no decay. Parameters without a gradient are not decayed, as in
``torch.optim``.

Masks and references are saved in the optimizer's ``state_dict`` (keys ``weight_decay_masks`` and
``weight_decay_references``, by parameter position like the optimizer's own state), so checkpoints hold them
and resuming restores them bit for bit; they follow their parameter's device and dtype (``model.to(...)``) at
the next step. A reference is one copy of its parameter, in the parameter's dtype and device; a DTensor
parameter's (FSDP2) is a DTensor sharded like it, so each rank holds its shard's reference only.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_nodecay._hook_checks import HookNames, Masks, check_mask, check_placement, check_reference
from lightning_nodecay._kernels import KERNELS
from lightning_nodecay._log import log
from lightning_nodecay._schema import (
    HOOK_WEIGHT_DECAY,
    LR,
    MASK_SHARE,
    MASKS_STATE,
    PARAMS,
    REFERENCES_STATE,
    WEIGHT_DECAY,
    Penalty,
)
from lightning_nodecay._semantics import (
    DecayStyle,
    group_penalty,
    group_style,
    group_toward,
    nested_step,
    step_value,
    unwrap_optimizer,
)
from lightning_nodecay.groups import DecayDecision

_ATTACHED: weakref.WeakKeyDictionary[Optimizer, WeightDecayHook] = weakref.WeakKeyDictionary()


def attach_weight_decay_hook(
    optimizer: Optimizer,
    masks: Masks | None = None,
    *,
    module: nn.Module | None = None,
    decay_style: DecayStyle | None = None,
    decisions: Iterable[DecayDecision] | None = None,
    references: Masks | None = None,
) -> WeightDecayHook:
    """Attach the weight-decay step hook: masks, L1 groups and decay toward a reference, inside ``optimizer.step()``.

    Call it once, after building the optimizer and before the first step. Every check runs
    here, before training.

    Args:
        optimizer: a ``torch.optim`` optimizer (or one with ``decay_style`` declared).
        masks: ``{parameter or name: multipliers}``. A name is the cleaned qualified name of
            :func:`~lightning_nodecay.decide` and needs ``module``. A mask scales the weight decay
            of the parameter's group element by element: ``0`` no decay, ``1`` the group's decay,
            ``2`` twice. It must broadcast to the parameter's shape, be finite and ``>= 0``; bool
            and integer masks are accepted. ``None`` or ``{}``: only L1 and reference groups are hooked.
        module: the model, to resolve names and report problems by name.
        decay_style: how the optimizer applies weight decay, required for optimizers outside
            ``torch.optim``: ``"coupled"`` (``grad += wd * p``) or ``"decoupled"``
            (``p *= 1 - lr * wd``).
        decisions: the decisions the groups were built from; then a mask on an excluded
            parameter is reported with the rule that excluded it, an L1 parameter outside an
            L1 group is refused, and so is a parameter to decay toward a reference outside a reference
            group; their explicit references (a ``weight_decay_toward`` state dict) are used.
        references: ``{parameter or name: tensor}``, the references of parameters in groups decayed toward one
            (``weight_decay_toward``), in place of their current values. A reference is copied into its
            parameter's dtype, device and sharding.

    Returns:
        The attached :class:`WeightDecayHook`.

    Raises:
        TypeError: a mask or reference is not a tensor, or is keyed by name without ``module``.
        ValueError: naming the parameter: a mask that does not broadcast, is negative, NaN or
            inf; a reference of another shape, or given for a parameter outside a reference group; an unknown
            or frozen name; a parameter not in the optimizer, in a group without
            decay or excluded by a rule; an unknown optimizer without ``decay_style``; a fused
            group; an optimizer that already has a hook; a gradient that is part of an autograd graph
            (``create_graph=True``) reaching a hooked group at a step (``RuntimeError``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2, bias=False)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.5)
        >>> handle = attach_weight_decay_hook(optimizer, {"weight": torch.tensor([[1.0], [0.0]])}, module=net)
        >>> _ = torch.nn.init.ones_(net.weight)
        >>> net.weight.grad = torch.zeros_like(net.weight)
        >>> optimizer.step()
        >>> net.weight  # row 0 decays by lr * wd = 5%, row 1 is masked out
        Parameter containing:
        tensor([[0.9500, 0.9500, 0.9500],
                [1.0000, 1.0000, 1.0000]], requires_grad=True)
        >>> {k: v for k, v in optimizer.param_groups[0].items() if "decay" in k}
        {'weight_decay': 0.0, 'hook_weight_decay': 0.5, 'weight_decay_mask_share': 1.0}
    """
    optimizer = unwrap_optimizer(optimizer)
    if optimizer in _ATTACHED:
        raise ValueError(
            f"`{type(optimizer).__name__}` already has a weight-decay hook; call `.remove()` on the"
            " `WeightDecayHook` that `attach_weight_decay_hook` returned before attaching a new one."
        )
    names = HookNames(optimizer, module, decisions)
    resolved = {id(param): (param, check_mask(names.of(param), param, mask)) for param, mask in names.resolve(masks)}
    given = _explicit_references(names)
    given.update({id(param): (param, ref) for param, ref in names.resolve(references, "reference")})
    return WeightDecayHook(optimizer, _plan(optimizer, resolved, given, names, decay_style), names, decay_style)


class WeightDecayHook:
    """The weight-decay step hook of one optimizer (masks, L1 and reference groups): :func:`attach_weight_decay_hook`.

    Attributes:
        names: ``{parameter: name}`` of the masked parameters and of those with a reference.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2, bias=False)
        >>> optimizer = torch.optim.AdamW(net.parameters(), weight_decay=0.1)
        >>> handle = attach_weight_decay_hook(optimizer, {"weight": torch.tensor([[1.0], [0.0]])}, module=net)
        >>> {name: mask.flatten().tolist() for name, mask in handle.named_masks().items()}
        {'weight': [1.0, 0.0]}
        >>> handle.remove()
        >>> optimizer.param_groups[0]["weight_decay"]
        0.1
    """

    def __init__(
        self, optimizer: Optimizer, groups: list[_HookedGroup], names: HookNames, declared: DecayStyle | None
    ) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._groups = groups
        self._declared = declared
        self._known = len(optimizer.param_groups)  # groups after these were added later (fine-tuning)
        self._pending: dict[str, dict[int, Tensor] | None] = {}
        self.names = {param: names.of(param) for param, _ in (*self._masked(), *self._referenced())}
        for hooked in groups:
            hooked.convert(optimizer.param_groups[hooked.index])
        #: how many ``optimizer.step()`` calls the hook ran for (nested ``super().step()`` calls count once)
        self.steps = 0
        self._checks: OrderedDict[int, Callable[[Optimizer], None]] = OrderedDict()  # weakly referenced by handles
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._take_saved),
            optimizer.register_load_state_dict_post_hook(self._restore),
        ]
        _ATTACHED[optimizer] = self

    @staticmethod
    def of(optimizer: Optimizer) -> WeightDecayHook | None:
        """The hook attached to ``optimizer``, or ``None``.

        Examples:
            >>> import torch
            >>> weight = torch.nn.Parameter(torch.ones(2, 2))
            >>> optimizer = torch.optim.SGD([weight], lr=0.1, weight_decay=0.1)
            >>> WeightDecayHook.of(optimizer) is None
            True
            >>> hook = attach_weight_decay_hook(optimizer, {weight: torch.eye(2)})
            >>> WeightDecayHook.of(optimizer) is hook
            True
        """
        return _ATTACHED.get(unwrap_optimizer(optimizer))

    @property
    def hooked_groups(self) -> list[int]:
        """Positions of the param groups whose weight decay the hook applies (masked and L1 groups)."""
        return [hooked.index for hooked in self._groups]

    def holds(self, index: int, params: Iterable[Tensor]) -> bool:
        """Tell whether group ``index`` holds exactly the parameters the hook decays for it."""
        hooked = next((h for h in self._groups if h.index == index), None)
        mine = {id(p) for batch in hooked.batches for p in batch.params} if hooked is not None else set()
        return mine == {id(p) for p in params}

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """``{parameter: mask}``; update a mask in place (``mask.copy_(...)``) to change it."""
        return dict(self._masked())

    @property
    def references(self) -> dict[Tensor, Tensor]:
        """``{parameter: reference}`` of the groups decayed toward a reference, on their parameters' device and dtype.

        Update a reference in place (``reference.copy_(...)``) to change it.
        """
        return dict(self._referenced())

    def group_references(self) -> dict[int, tuple[list[Tensor], list[Tensor]]]:
        """``{group position: (parameters, their references)}`` of the groups decayed toward a reference."""
        found = {}
        for hooked in self._groups:
            pairs = list(hooked.referenced())
            if pairs:
                found[hooked.index] = ([p for p, _ in pairs], [r for _, r in pairs])
        return found

    def add_groups(
        self, decisions: Iterable[DecayDecision] | None = None, module: nn.Module | None = None
    ) -> list[int]:
        """Take over the groups added to the optimizer since the hook was attached that need it (L1, references).

        The references of their parameters are their values now: a fine-tuning callback calls this right after it
        unfreezes them (:func:`~lightning_nodecay.unfreeze_and_add_param_groups` does).

        Args:
            decisions: the decisions of the new groups' parameters, as for :func:`attach_weight_decay_hook`.
            module: the model, to name parameters in messages.

        Returns:
            The positions of the groups taken over.
        """
        optimizer = self._optimizer()
        if optimizer is None:
            return []
        names = HookNames(optimizer, module, decisions)
        added = _plan(optimizer, {}, _explicit_references(names), names, self._declared, start=self._known)
        self._known = len(optimizer.param_groups)
        for hooked in added:
            hooked.convert(optimizer.param_groups[hooked.index])
        self._groups += added
        self.names.update({param: names.of(param) for hooked in added for param, _ in hooked.referenced()})
        return [hooked.index for hooked in added]

    def named_masks(self) -> dict[str, Tensor]:
        """``{parameter name: mask}``."""
        return {self.names[param]: mask for param, mask in self._masked()}

    def remove(self) -> None:
        """Detach: remove the hooks and give the hooked groups their ``weight_decay`` back."""
        optimizer = self._optimizer()
        for hook in self._hooks:
            hook.remove()
        if optimizer is None:
            return
        for hooked in self._groups:
            group = optimizer.param_groups[hooked.index]
            group[WEIGHT_DECAY] = group.pop(HOOK_WEIGHT_DECAY)
            group.pop(MASK_SHARE, None)
        _ATTACHED.pop(optimizer, None)

    def _masked(self) -> Iterator[tuple[Tensor, Tensor]]:
        for hooked in self._groups:
            for batch in hooked.batches:
                if batch.masks is not None:
                    yield from zip(batch.params, batch.masks, strict=True)

    def _referenced(self) -> Iterator[tuple[Tensor, Tensor]]:
        for hooked in self._groups:
            yield from hooked.referenced()

    def add_check(self, check: Callable[[Optimizer], None]) -> RemovableHandle:
        """Run ``check(optimizer)`` at every step right before the hook decays (it may raise to refuse the step).

        That is once the gradients are final, after Lightning's ``on_before_optimizer_step``, before the update.
        """
        handle = RemovableHandle(self._checks)
        self._checks[handle.id] = check
        return handle

    def _pre_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if nested_step(optimizer):  # a subclass's `super().step()`: the outer call decays, once
            return None
        self.steps += 1
        return after_closure(args, kwargs, lambda: self._checked_decay(optimizer))

    def _checked_decay(self, optimizer: Optimizer) -> None:
        for check in list(self._checks.values()):
            check(optimizer)
        self._decay(optimizer)

    @torch.no_grad()
    def _decay(self, optimizer: Optimizer) -> None:
        for hooked in self._groups:
            group = optimizer.param_groups[hooked.index]
            weight_decay = group[HOOK_WEIGHT_DECAY]
            if not weight_decay:
                continue
            value = step_value(optimizer, group, hooked.style, weight_decay, hooked.reference_lr)
            for batch in hooked.batches:
                params, grads, masks, refs = batch.with_grads()
                if params:
                    KERNELS[hooked.style, hooked.penalty](params, grads, masks, refs, value)

    def _save(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        positions = _positions(optimizer)
        state_dict[MASKS_STATE] = {positions[id(param)]: mask for param, mask in self._masked()}
        references = {positions[id(param)]: ref for param, ref in self._referenced()}
        if references:
            state_dict[REFERENCES_STATE] = references

    def _take_saved(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        self._pending = {key: state_dict.pop(key, None) for key in (MASKS_STATE, REFERENCES_STATE)}

    def _restore(self, optimizer: Optimizer) -> None:
        """After ``load_state_dict`` replaced the group dicts: hook them again, restore the masks and references."""
        for hooked in self._groups:
            hooked.convert(optimizer.param_groups[hooked.index])
        pending, self._pending = self._pending, {}
        positions = _positions(optimizer)
        for key, what in ((MASKS_STATE, "masks"), (REFERENCES_STATE, "references")):
            saved = pending.get(key)
            if saved is None and what == "masks":  # a state without masks: the declared ones stay, silently
                continue
            saved = saved or {}  # without references: each parameter that has one is named in a warning
            used = set()
            for hooked in self._groups:
                for batch in hooked.batches:
                    used.update(batch.restore(what, saved, positions, self.names))
            unused = sorted(set(saved) - used)
            if unused:
                log.warning(
                    f"The checkpoint holds weight-decay {what} for parameters at positions {unused} of"
                    f" `{type(optimizer).__name__}` that have none in this run; they are ignored."
                )


@dataclass
class _Batch:
    """Parameters of one hooked group that share a form: all masked, or all unmasked (``masks=None``).

    In a group decayed toward a reference, ``refs`` holds each parameter's reference (else ``None``).
    """

    params: list[Tensor]
    masks: list[Tensor] | None
    refs: list[Tensor] | None = None

    def with_grads(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor] | None]:
        """Parameters that have a gradient, their gradients, masks and references (on their device and dtype)."""
        params, grads, masks, refs = [], [], [], []
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if grad.requires_grad:
                _refuse_graph_gradient(param)
            params.append(param)
            grads.append(grad)
            if self.masks is not None:
                masks.append(_follow(self.masks, i, param))
            if self.refs is not None:
                refs.append(_follow(self.refs, i, param))
        return params, grads, None if self.masks is None else masks, None if self.refs is None else refs

    def referenced(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(parameter, reference)`` pairs, the references on their parameters' device and dtype."""
        if self.refs is not None:
            for i, param in enumerate(self.params):
                yield param, _follow(self.refs, i, param)

    def restore(
        self, what: str, saved: Mapping[int, Tensor], positions: Mapping[int, int], names: Mapping[Tensor, str]
    ) -> set[int]:
        """Take the saved ``what`` (``"masks"`` or ``"references"``) of the batch's parameters; return the positions."""
        mine = self.masks if what == "masks" else self.refs
        if mine is None:
            return set()
        check = check_mask if what == "masks" else check_reference
        used = set()
        for i, param in enumerate(self.params):
            position = positions[id(param)]
            if position in saved:
                mine[i] = check(names[param], param, saved[position])
                used.add(position)
            else:
                kept = "its mask" if what == "masks" else "its reference: its value when the hook took its group over"
                log.warning(f"The checkpoint holds no weight-decay {what[:-1]} for `{names[param]}`; it keeps {kept}.")
        return used


def _follow(tensors: list[Tensor], i: int, param: Tensor) -> Tensor:
    """``tensors[i]``, moved for good to ``param``'s device and dtype when they changed (``model.to(...)``)."""
    tensor = tensors[i]
    if tensor.device != param.device or tensor.dtype != param.dtype:
        tensor = tensors[i] = tensor.to(device=param.device, dtype=param.dtype)
    return tensor


@dataclass
class _HookedGroup:
    """One param group whose weight decay the hook applies."""

    index: int
    style: DecayStyle
    penalty: Penalty
    batches: list[_Batch]
    mask_share: float
    #: the lr the independent style divides by when the optimizer keeps none (the group's lr when hooked)
    reference_lr: float

    def convert(self, group: dict[str, Any]) -> None:
        """Move ``weight_decay`` to the hook's key (idempotent) and record the mask share."""
        if HOOK_WEIGHT_DECAY not in group:
            group[HOOK_WEIGHT_DECAY] = group[WEIGHT_DECAY]
            group[WEIGHT_DECAY] = 0.0
        if self.mask_share:
            group[MASK_SHARE] = self.mask_share

    def referenced(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            yield from batch.referenced()


def _explicit_references(names: HookNames) -> dict[int, tuple[Tensor, Tensor]]:
    """``{id(param): (param, reference)}`` of the decisions that carry a reference (a reference state dict)."""
    return {id(d.param): (d.param, d.reference) for d in names.decisions if d.reference is not None}


def _plan(
    optimizer: Optimizer,
    masks: Mapping[int, tuple[Tensor, Tensor]],
    references: Mapping[int, tuple[Tensor, Tensor]],
    names: HookNames,
    declared: DecayStyle | None,
    start: int = 0,
) -> list[_HookedGroup]:
    """Validate placement and style; one :class:`_HookedGroup` per group from ``start`` with masks, L1 or references."""
    placed = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g[PARAMS]}
    for param, _ in masks.values():
        check_placement(optimizer, param, placed.get(id(param)), names)
    names.check_forms(optimizer, placed)
    for param, _ in references.values():
        index = placed.get(id(param))
        if index is None or group_toward(optimizer, index) != "initial":
            raise ValueError(
                f"Parameter `{names.of(param)}` has a weight-decay reference but is in no group of"
                f" `{type(optimizer).__name__}` decayed toward a reference. Declare `weight_decay_toward` in the rules"
                " the groups are built from, or give references only for parameters of such groups."
            )
    hooked = []
    for index, group in enumerate(optimizer.param_groups[start:], start):
        penalty, toward = group_penalty(optimizer, index), group_toward(optimizer, index)
        if penalty == "l2" and toward == "zero" and not any(id(p) in masks for p in group[PARAMS]):
            continue
        style = group_style(optimizer, index, declared)
        names.check_no_excluded(optimizer, index)
        masked = [p for p in group[PARAMS] if id(p) in masks]
        plain = [p for p in group[PARAMS] if id(p) not in masks]
        batches = [_Batch(masked, [masks[id(p)][1] for p in masked])] if masked else []
        batches += [_Batch(plain, None)] if plain else []
        if toward == "initial":
            for batch in batches:
                batch.refs = [
                    check_reference(names.of(p), p, references[id(p)][1] if id(p) in references else p)
                    for p in batch.params
                ]
        share = sum(p.numel() for p in masked) / max(1, sum(p.numel() for p in group[PARAMS]))
        hooked.append(_HookedGroup(index, style, penalty, batches, share, float(group[LR])))
    return hooked


def after_closure(args: tuple[Any, ...], kwargs: dict[str, Any], action: Callable[[], None]) -> Any:
    """Run ``action`` once the gradients are final, before the update: what an optimizer step pre-hook returns.

    When ``step`` gets a closure (Lightning's default: backward, clipping and ``on_before_optimizer_step`` run
    inside it), the closure is wrapped to run ``action`` right after it, once; without one (AMP's
    ``GradScaler``), ``action`` runs now.
    """
    closure = kwargs.get("closure")
    positional = closure is None and len(args) > 1 and callable(args[1])
    if positional:
        closure = args[1]
    if closure is None:
        action()
        return None
    done = False
    inner: Callable[[], Any] = closure

    def closure_then_action() -> Any:
        nonlocal done
        loss = inner()
        if not done:
            done = True
            action()
        return loss

    if positional:
        return (args[0], closure_then_action, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure_then_action}


def _refuse_graph_gradient(param: Tensor) -> None:
    raise RuntimeError(
        f"A parameter of shape {tuple(param.shape)} in a masked or L1 group has a gradient that is part of an autograd"
        " graph (`backward(create_graph=True)`, as second-order optimizers such as AdaHessian or Sophia use). The"
        " weight-decay hook changes parameters or gradients in place, inside that graph, before the optimizer"
        " differentiates through it. Masks and L1 are not supported with such optimizers: remove the masks and"
        " `weight_decay_l1` rules for them, and keep exclusions and multipliers (plain param groups)."
    )


def _positions(optimizer: Optimizer) -> dict[int, int]:
    """``{id(param): position}`` in the numbering of the optimizer's ``state_dict``."""
    params = (p for g in optimizer.param_groups for p in g[PARAMS])
    return {id(p): i for i, p in enumerate(params)}
