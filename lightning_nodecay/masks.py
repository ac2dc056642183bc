"""Per-element weight-decay masks and L1 penalties, applied inside the optimizer step. Pure PyTorch.

A param group gives all its tensors one weight decay. A *mask* goes finer: a tensor of multipliers
for one parameter (same shape as the parameter, or broadcastable to it, e.g. one multiplier per
output row), scaling the decay the parameter's group gives it, element by element. An *L1 group*
(``{"weight_decay_penalty": "l1"}``, built by the ``weight_decay_l1`` rules) penalizes ``|p|``
instead of ``p**2``. No ``torch.optim`` optimizer offers either, so both are applied by an
optimizer step pre-hook, with the optimizer's own semantics and the group's *current* ``lr``:

=========  =============================  ===============================================
style      L2 (weight decay)              L1
=========  =============================  ===============================================
coupled    ``grad += wd * mask * p``      ``grad += wd * mask * sign(p)``
decoupled  ``p *= 1 - lr * wd * mask``    ``p = sign(p) * max(|p| - lr * wd * mask, 0)``
=========  =============================  ===============================================

Coupled optimizers (SGD, Adam, RMSprop, Adagrad, Adamax, NAdam, RAdam, ASGD, Adadelta) add the
decay to the gradient they then transform; decoupled ones (AdamW, and Adam/NAdam/RAdam with
``decoupled_weight_decay=True``) shrink the weights directly. Other optimizers need
``decay_style=`` declared: their semantics are never guessed. With ``maximize=True`` the coupled
term is subtracted, as the optimizer negates the gradient before adding its decay.

A group holding a masked parameter or asking for L1 is *hooked*: its ``weight_decay`` moves to
the key ``hook_weight_decay`` (the optimizer itself then sees ``weight_decay=0.0``) and the hook
applies it to every parameter of the group (unmasked ones with multiplier 1). Hooked groups with
masks also carry ``weight_decay_mask_share``, the share of their elements under a mask.
Group layout, names and LR schedulers are untouched.

The hook runs after the gradients are final and before the update: when ``step`` gets a closure
(Lightning's default), the decay runs right after the closure, i.e. after backward, gradient
accumulation and gradient clipping, as the optimizer's own decay would; when ``step`` is called
without one (AMP's ``GradScaler``), it runs before the update. A step that ``GradScaler`` skips
never calls ``optimizer.step``, so it applies no decay. Parameters without a gradient are not
decayed, as in ``torch.optim``.

Masks are saved in the optimizer's ``state_dict`` (key ``weight_decay_masks``, by parameter
position like the optimizer's own state), so checkpoints hold them and resuming restores them;
they follow their parameter's device and dtype (``model.to(...)``) at the next step.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from torch import Tensor, nn
from torch.optim import ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, Optimizer, RAdam, RMSprop

from lightning_nodecay._log import log
from lightning_nodecay.groups import PENALTY_KEY, DecayDecision, Penalty, _unwrap
from lightning_nodecay.layout import group_label, param_names
from lightning_nodecay.rules import clean_name

#: How an optimizer applies weight decay: added to the gradient (``"coupled"``) or shrinking the weights
#: (``"decoupled"``).
DecayStyle = Literal["coupled", "decoupled"]
TensorList = Union[list[Tensor], tuple[Tensor, ...]]  # noqa: UP007 (what `torch._foreach_*` takes)
#: Masks keyed by parameter name (needs ``module``), by parameter, or both.
Masks = Union[Mapping[str, Tensor], Mapping[Tensor, Tensor], Mapping[Union[str, Tensor], Tensor]]  # noqa: UP007

#: Param-group key of a hooked group: the weight decay the hook applies.
HOOK_WEIGHT_DECAY_KEY = "hook_weight_decay"
#: Param-group key of a hooked group with masks: share of its elements that are under a mask.
MASK_SHARE_KEY = "weight_decay_mask_share"
#: Optimizer ``state_dict`` key holding the masks, ``{parameter position: mask}``.
STATE_DICT_KEY = "weight_decay_masks"

_COUPLED: tuple[type[Optimizer], ...] = (SGD, RMSprop, Adagrad, Adamax, ASGD, Adadelta)
#: Optimizers whose style is given by their group's ``decoupled_weight_decay`` flag.
_FLAGGED: tuple[type[Optimizer], ...] = (Adam, NAdam, RAdam)

_ATTACHED: weakref.WeakKeyDictionary[Optimizer, WeightDecayMasks] = weakref.WeakKeyDictionary()


def apply_weight_decay_masks(
    optimizer: Optimizer,
    masks: Masks | None = None,
    *,
    module: nn.Module | None = None,
    decay_style: DecayStyle | None = None,
    decisions: Iterable[DecayDecision] | None = None,
) -> WeightDecayMasks:
    """Apply per-element weight-decay masks and L1 groups inside ``optimizer.step()``.

    Call it once, after building the optimizer and before the first step. Every check runs
    here, before training.

    Args:
        optimizer: a ``torch.optim`` optimizer (or one with ``decay_style`` declared).
        masks: ``{parameter or name: multipliers}``. A name is the cleaned qualified name of
            :func:`~lightning_nodecay.decide` and needs ``module``. A mask scales the weight decay
            of the parameter's group element by element: ``0`` no decay, ``1`` the group's decay,
            ``2`` twice. It must broadcast to the parameter's shape, be finite and ``>= 0``; bool
            and integer masks are accepted. ``None`` or ``{}``: only L1 groups are hooked.
        module: the model, to resolve names and report problems by name.
        decay_style: how the optimizer applies weight decay, required for optimizers outside
            ``torch.optim``: ``"coupled"`` (``grad += wd * p``) or ``"decoupled"``
            (``p *= 1 - lr * wd``).
        decisions: the decisions the groups were built from; then a mask on an excluded
            parameter is reported with the rule that excluded it, and an L1 parameter outside an
            L1 group is refused.

    Returns:
        The :class:`WeightDecayMasks` handle.

    Raises:
        TypeError: a mask is not a tensor, or is keyed by name without ``module``.
        ValueError: naming the parameter: a mask that does not broadcast, is negative, NaN or
            inf; an unknown or frozen name; a parameter not in the optimizer, in a group without
            decay or excluded by a rule; an unknown optimizer without ``decay_style``; a fused
            group; an optimizer that already has masks.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2, bias=False)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.5)
        >>> handle = apply_weight_decay_masks(optimizer, {"weight": torch.tensor([[1.0], [0.0]])}, module=net)
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
    if optimizer in _ATTACHED:
        raise ValueError(
            f"`{type(optimizer).__name__}` already has weight-decay masks; call `.remove()` on the"
            " handle `apply_weight_decay_masks` returned before applying new ones."
        )
    names = _Names(optimizer, module, decisions)
    resolved = {id(param): (param, _check_mask(names.of(param), param, mask)) for param, mask in names.resolve(masks)}
    return WeightDecayMasks(optimizer, _plan(optimizer, resolved, names, decay_style), names)


def attached_masks(optimizer: Optimizer) -> WeightDecayMasks | None:
    """The handle of the masks applied to ``optimizer``, or ``None``.

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.ones(2, 2))
        >>> optimizer = torch.optim.SGD([weight], lr=0.1, weight_decay=0.1)
        >>> attached_masks(optimizer) is None
        True
        >>> handle = apply_weight_decay_masks(optimizer, {weight: torch.eye(2)})
        >>> attached_masks(optimizer) is handle
        True
    """
    return _ATTACHED.get(optimizer)


def needs_weight_decay_hook(optimizer: Optimizer, masks: Masks, decisions: Iterable[DecayDecision]) -> bool:
    """Tell whether masks, L1 decisions or L1 groups ask for :func:`apply_weight_decay_masks`."""
    return (
        bool(masks)
        or any(d.penalty == "l1" for d in decisions)
        or any(g.get(PENALTY_KEY, "l2") != "l2" for g in optimizer.param_groups)
    )


class WeightDecayMasks:
    """Handle of the masks and L1 groups applied to one optimizer by :func:`apply_weight_decay_masks`.

    Attributes:
        names: ``{parameter: name}`` of the masked parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2, bias=False)
        >>> optimizer = torch.optim.AdamW(net.parameters(), weight_decay=0.1)
        >>> handle = apply_weight_decay_masks(optimizer, {"weight": torch.tensor([[1.0], [0.0]])}, module=net)
        >>> {name: mask.flatten().tolist() for name, mask in handle.named_masks().items()}
        {'weight': [1.0, 0.0]}
        >>> handle.remove()
        >>> optimizer.param_groups[0]["weight_decay"]
        0.1
    """

    def __init__(self, optimizer: Optimizer, groups: list[_HookedGroup], names: _Names) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._groups = groups
        self._pending: dict[int, Tensor] | None = None
        self.names = {param: names.of(param) for param, _ in self._masked()}
        for hooked in groups:
            hooked.convert(optimizer.param_groups[hooked.index])
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._take_saved),
            optimizer.register_load_state_dict_post_hook(self._restore),
        ]
        _ATTACHED[optimizer] = self

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """``{parameter: mask}``; update a mask in place (``mask.copy_(...)``) to change it."""
        return dict(self._masked())

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
            group["weight_decay"] = group.pop(HOOK_WEIGHT_DECAY_KEY)
            group.pop(MASK_SHARE_KEY, None)
        _ATTACHED.pop(optimizer, None)

    def _masked(self) -> Iterator[tuple[Tensor, Tensor]]:
        for hooked in self._groups:
            for batch in hooked.batches:
                if batch.masks is not None:
                    yield from zip(batch.params, batch.masks, strict=True)

    def _pre_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        closure = kwargs.get("closure")
        positional = closure is None and len(args) > 1 and callable(args[1])
        if positional:
            closure = args[1]
        if closure is None:
            self._decay(optimizer)
            return None
        wrapped = self._decay_after(optimizer, closure)
        if positional:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _decay_after(self, optimizer: Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        """Wrap the closure: the gradients are final (backward, clipping) only once it has run."""
        done = False

        def closure_then_decay() -> Any:
            nonlocal done
            loss = closure()
            if not done:
                done = True
                self._decay(optimizer)
            return loss

        return closure_then_decay

    @torch.no_grad()
    def _decay(self, optimizer: Optimizer) -> None:
        for hooked in self._groups:
            group = optimizer.param_groups[hooked.index]
            weight_decay = group[HOOK_WEIGHT_DECAY_KEY]
            if not weight_decay:
                continue
            if hooked.style == "coupled":
                value = -weight_decay if group.get("maximize") else weight_decay
            else:
                value = float(group["lr"]) * weight_decay
            for batch in hooked.batches:
                params, grads, masks = batch.with_grads()
                if params:
                    _APPLY[hooked.style, hooked.penalty](params, grads, masks, value)

    def _save(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        positions = _positions(optimizer)
        state_dict[STATE_DICT_KEY] = {positions[id(param)]: mask for param, mask in self._masked()}

    def _take_saved(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.pop(STATE_DICT_KEY, None)

    def _restore(self, optimizer: Optimizer) -> None:
        """After ``load_state_dict`` replaced the group dicts: hook them again, restore the masks."""
        for hooked in self._groups:
            hooked.convert(optimizer.param_groups[hooked.index])
        saved, self._pending = self._pending, None
        if saved is None:
            return
        positions = _positions(optimizer)
        masked = set()
        for hooked in self._groups:
            for batch in hooked.batches:
                masked.update(batch.restore(saved, positions, self.names))
        unused = sorted(set(saved) - masked)
        if unused:
            log.warning(
                f"The checkpoint holds weight-decay masks for parameters at positions {unused} of"
                f" `{type(optimizer).__name__}` that are not masked in this run; they are ignored."
            )


@dataclass
class _Batch:
    """Parameters of one hooked group that share a form: all masked, or all unmasked (``masks=None``)."""

    params: list[Tensor]
    masks: list[Tensor] | None

    def with_grads(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """Parameters that have a gradient, their gradients and masks (on their device and dtype)."""
        params, grads, masks = [], [], []
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            params.append(param)
            grads.append(param.grad)
            if self.masks is not None:
                mask = self.masks[i]
                if mask.device != param.device or mask.dtype != param.dtype:
                    mask = self.masks[i] = mask.to(device=param.device, dtype=param.dtype)
                masks.append(mask)
        return params, grads, None if self.masks is None else masks

    def restore(
        self, saved: Mapping[int, Tensor], positions: Mapping[int, int], names: Mapping[Tensor, str]
    ) -> set[int]:
        """Take the saved masks of this batch's parameters; return the positions used."""
        if self.masks is None:
            return set()
        used = set()
        for i, param in enumerate(self.params):
            position = positions[id(param)]
            if position in saved:
                self.masks[i] = _check_mask(names[param], param, saved[position])
                used.add(position)
            else:
                log.warning(f"The checkpoint holds no weight-decay mask for `{names[param]}`; it keeps its mask.")
        return used


@dataclass
class _HookedGroup:
    """One param group whose weight decay the hook applies."""

    index: int
    style: DecayStyle
    penalty: Penalty
    batches: list[_Batch]
    mask_share: float

    def convert(self, group: dict[str, Any]) -> None:
        """Move ``weight_decay`` to the hook's key (idempotent) and record the mask share."""
        if HOOK_WEIGHT_DECAY_KEY not in group:
            group[HOOK_WEIGHT_DECAY_KEY] = group["weight_decay"]
            group["weight_decay"] = 0.0
        if self.mask_share:
            group[MASK_SHARE_KEY] = self.mask_share


def _plan(
    optimizer: Optimizer, masks: Mapping[int, tuple[Tensor, Tensor]], names: _Names, declared: DecayStyle | None
) -> list[_HookedGroup]:
    """Validate placement and style; one :class:`_HookedGroup` per group with masks or L1."""
    placed = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for param, _ in masks.values():
        _check_placement(optimizer, param, placed.get(id(param)), names)
    names.check_l1(optimizer, placed)
    hooked = []
    for index, group in enumerate(optimizer.param_groups):
        penalty = _penalty(optimizer, index)
        if penalty == "l2" and not any(id(p) in masks for p in group["params"]):
            continue
        style = _style(optimizer, index, declared)
        names.check_no_excluded(optimizer, index)
        masked = [masks[id(p)] for p in group["params"] if id(p) in masks]
        plain = [p for p in group["params"] if id(p) not in masks]
        batches = [_Batch([p for p, _ in masked], [m for _, m in masked])] if masked else []
        batches += [_Batch(plain, None)] if plain else []
        share = sum(p.numel() for p, _ in masked) / max(1, sum(p.numel() for p in group["params"]))
        hooked.append(_HookedGroup(index, style, penalty, batches, share))
    return hooked


def _check_placement(optimizer: Optimizer, param: Tensor, index: int | None, names: _Names) -> None:
    name, label = names.of(param), type(optimizer).__name__
    if index is None:
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is in no param group of `{label}`. Mask"
            " only parameters that this optimizer trains, or add the parameter to it."
        )
    excluded = names.excluded.get(id(param))
    if excluded is not None:
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is excluded from weight decay by"
            f" {excluded}, so the mask would have no effect. Remove the mask, or stop excluding the"
            " parameter (a mask scales the decay a parameter gets; it does not override exclusions)."
        )
    if not optimizer.param_groups[index].get("weight_decay"):
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is in group {_group_label(optimizer, index)}"
            f" of `{label}`, whose weight_decay is 0, so the mask would have no effect. Remove the"
            " mask, or put the parameter in a group with weight decay."
        )


def _penalty(optimizer: Optimizer, index: int) -> Penalty:
    penalty = optimizer.param_groups[index].get(PENALTY_KEY, "l2")
    if penalty not in get_args(Penalty):
        raise ValueError(
            f"Group {_group_label(optimizer, index)} of `{type(optimizer).__name__}` has"
            f" `{PENALTY_KEY}={penalty!r}`; use 'l2' (weight decay) or 'l1'."
        )
    return penalty


def _style(optimizer: Optimizer, index: int, declared: DecayStyle | None) -> DecayStyle:
    """The decay semantics of a group: known for ``torch.optim`` optimizers, declared otherwise."""
    group, label = optimizer.param_groups[index], type(optimizer).__name__
    if "weight_decay" not in group:
        raise ValueError(
            f"`{label}` has no `weight_decay` option, so weight-decay masks and L1 groups cannot take"
            " its decay over. Use an optimizer with weight decay."
        )
    if group.get("fused"):
        raise ValueError(
            f"Group {_group_label(optimizer, index)} of `{label}` uses `fused=True`: fused kernels unscale"
            " AMP gradients and skip overflowing steps inside the kernel, after the mask hook ran, so"
            " masked or L1 decay could see scaled gradients or decay on skipped steps. Use the default"
            " `foreach` implementation (`fused=None`)."
        )
    known = _known_style(optimizer, group)
    if declared is None:
        if known is None:
            raise ValueError(
                f"`{label}` is not a `torch.optim` optimizer whose weight-decay semantics are known, so"
                " masks and L1 cannot be applied the way it applies decay. Declare them:"
                ' `decay_style="coupled"` if it adds `weight_decay * p` to the gradient (SGD, Adam),'
                ' or `decay_style="decoupled"` if it shrinks weights by `lr * weight_decay` (AdamW);'
                ' with `NoDecayMixin` set `weight_decay_style = "coupled"` or `"decoupled"`.'
            )
        return known
    if declared not in get_args(DecayStyle):
        raise ValueError(f"`decay_style` must be 'coupled' or 'decoupled'; got {declared!r}.")
    if known is not None and known != declared:
        raise ValueError(
            f"`decay_style={declared!r}` contradicts `{label}`, whose weight decay is {known}"
            f" (group {_group_label(optimizer, index)}). Leave `decay_style` unset for `torch.optim` optimizers."
        )
    return declared


def _known_style(optimizer: Optimizer, group: Mapping[str, Any]) -> DecayStyle | None:
    kind = type(optimizer)
    if kind is AdamW or (kind in _FLAGGED and group.get("decoupled_weight_decay")):
        return "decoupled"
    if kind in _FLAGGED or kind in _COUPLED:
        return "coupled"
    return None


def _group_label(optimizer: Optimizer, index: int) -> str:
    return f"`{group_label(optimizer.param_groups[index], index)}`"


def _check_mask(name: str, param: Tensor, mask: object) -> Tensor:
    """Validate one mask and cast it to the parameter's device and dtype."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"The weight-decay mask of `{name}` must be a tensor; got {type(mask).__name__}.")
    try:
        shape = torch.broadcast_shapes(mask.shape, param.shape)
    except RuntimeError:
        shape = None
    if shape != param.shape:
        row = (param.shape[0],) + (1,) * (param.ndim - 1) if param.ndim else ()
        raise ValueError(
            f"The weight-decay mask of `{name}` has shape {tuple(mask.shape)}, which does not broadcast"
            f" to the parameter's shape {tuple(param.shape)}. Give one multiplier per element (shape"
            f" {tuple(param.shape)}) or a broadcastable shape such as {row} (one per output row)."
        )
    values = mask.detach() if mask.is_floating_point() else mask.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"The weight-decay mask of `{name}` contains NaN or inf; multipliers must be finite.")
    if bool((values < 0).any()):
        raise ValueError(
            f"The weight-decay mask of `{name}` has a negative multiplier ({values.min().item():g});"
            " multipliers must be >= 0 (0 = no decay, 1 = the group's decay)."
        )
    return mask.detach().to(device=param.device, dtype=param.dtype)


class _Names:
    """Parameter names for keys and messages, from the module, the decisions or the optimizer."""

    def __init__(
        self, optimizer: Optimizer, module: nn.Module | None, decisions: Iterable[DecayDecision] | None
    ) -> None:
        self.module = module
        self.decisions = list(decisions or ())
        self.excluded = {id(d.param): d.reason for d in self.decisions if d.multiplier == 0}
        self.by_name: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        for i, group in enumerate(optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                self._names[id(param)] = f"param_groups[{i}]['params'][{j}]"
        self._names.update({id(d.param): d.name for d in self.decisions})
        if module is not None:
            for name, param in _unwrap(module).named_parameters(remove_duplicate=False):
                self.by_name.setdefault(clean_name(name), param)
            self._names.update(param_names(_unwrap(module)))

    def of(self, param: Tensor) -> str:
        return self._names.get(id(param), f"<parameter of shape {tuple(param.shape)}>")

    def resolve(self, masks: Masks | None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(parameter, mask)`` pairs, each parameter once, names checked."""
        if masks is None:
            return
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"Weight-decay masks must be a dict `{{parameter name: tensor}}`; got {type(masks).__name__}."
            )
        seen: dict[int, str] = {}
        for key, mask in masks.items():
            param = self._param(key)
            if id(param) in seen:
                raise ValueError(
                    f"Parameter `{self.of(param)}` has two weight-decay masks (keys `{seen[id(param)]}` and"
                    f" `{key if isinstance(key, str) else self.of(param)}`); give one."
                )
            seen[id(param)] = key if isinstance(key, str) else self.of(param)
            yield param, mask

    def _param(self, key: object) -> Tensor:
        if isinstance(key, Tensor):
            if not key.requires_grad:
                raise ValueError(
                    f"Parameter `{self.of(key)}` has a weight-decay mask but is frozen (requires_grad=False), so it"
                    " is never decayed. Remove the mask, or unfreeze the parameter."
                )
            return key
        if not isinstance(key, str):
            raise TypeError(f"Weight-decay masks are keyed by parameter name or parameter; got {key!r}.")
        if self.module is None:
            raise TypeError(
                f"The weight-decay mask `{key}` is keyed by name: pass the model as"
                " `apply_weight_decay_masks(..., module=model)` so names can be resolved."
            )
        param = self.by_name.get(clean_name(key))
        if param is None:
            trainable = [n for n, p in self.by_name.items() if p.requires_grad]
            close = difflib.get_close_matches(key, trainable, n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"Weight-decay mask for unknown parameter `{key}`.{hint} Key masks by the parameter names that"
                " `lightning_nodecay.decide(module)` reports (`named_parameters()` without wrapper segments)."
            )
        if not param.requires_grad:
            raise ValueError(
                f"Parameter `{key}` has a weight-decay mask but is frozen (requires_grad=False), so it is"
                " never decayed. Remove the mask, or unfreeze the parameter."
            )
        return param

    def check_no_excluded(self, optimizer: Optimizer, index: int) -> None:
        """Refuse a hooked group holding an excluded parameter: the hook would decay it."""
        group = optimizer.param_groups[index]
        excluded = [p for p in group["params"] if id(p) in self.excluded]
        if excluded and group.get("weight_decay"):
            name = self.of(excluded[0])
            raise ValueError(
                f"Parameter `{name}` is excluded from weight decay by {self.excluded[id(excluded[0])]} but is"
                f" in group {_group_label(optimizer, index)} of `{type(optimizer).__name__}`, whose decay the"
                " mask / L1 hook applies to every parameter. Put it in a group with `weight_decay=0.0`"
                " (`param_groups(...)` and `NoDecayMixin.configure_param_groups()` do)."
            )

    def check_l1(self, optimizer: Optimizer, placed: Mapping[int, int]) -> None:
        """Refuse an L1-decided parameter sitting in a group that is not an L1 group."""
        for decision in self.decisions:
            index = placed.get(id(decision.param))
            if decision.penalty == "l1" and index is not None and _penalty(optimizer, index) != "l1":
                raise ValueError(
                    f"Parameter `{decision.name}` should get an L1 penalty ({decision.reason}) but is in"
                    f" group {_group_label(optimizer, index)} of `{type(optimizer).__name__}`, which has no"
                    f" `'{PENALTY_KEY}': 'l1'`. Build the groups with `param_groups(...)` or"
                    " `NoDecayMixin.configure_param_groups()`, which put it in an L1 group."
                )


def _positions(optimizer: Optimizer) -> dict[int, int]:
    """``{id(param): position}`` in the numbering of the optimizer's ``state_dict``."""
    params = (p for g in optimizer.param_groups for p in g["params"])
    return {id(p): i for i, p in enumerate(params)}


def _scaled_add(targets: TensorList, sources: TensorList, masks: TensorList | None, value: float) -> None:
    """``targets += value * sources * masks`` (masks of ones when ``None``), one multi-tensor op."""
    if masks is None:
        torch._foreach_add_(targets, sources, alpha=value)
    else:
        torch._foreach_addcmul_(targets, sources, masks, value=value)


def _coupled_l2(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    _scaled_add(grads, params, masks, value)


def _coupled_l1(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    _scaled_add(grads, torch._foreach_sign(params), masks, value)


def _decoupled_l2(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    if masks is None:
        torch._foreach_mul_(params, 1 - value)  # AdamW's own formula
    else:
        torch._foreach_addcmul_(params, params, masks, value=-value)


def _decoupled_l1(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    """Proximal step of ``value * mask * |p|``: shrink magnitudes by the threshold, stop at 0."""
    shrunk = torch._foreach_abs(params)
    if masks is None:
        torch._foreach_sub_(shrunk, value)
    else:
        torch._foreach_add_(shrunk, masks, alpha=-value)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_sign_(params)
    torch._foreach_mul_(params, shrunk)


_APPLY: dict[tuple[str, str], Callable[[list[Tensor], list[Tensor], list[Tensor] | None, float], None]] = {
    ("coupled", "l2"): _coupled_l2,
    ("coupled", "l1"): _coupled_l1,
    ("decoupled", "l2"): _decoupled_l2,
    ("decoupled", "l1"): _decoupled_l1,
}
