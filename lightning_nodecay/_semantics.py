"""How an optimizer applies weight decay, and which groups the step hook must take over. Pure PyTorch.

===========  ========================================  ===================================================
style        L2 (weight decay)                         L1
===========  ========================================  ===================================================
coupled      ``grad += wd * mask * p``                 ``grad += wd * mask * sign(p)``
decoupled    ``p *= 1 - lr * wd * mask``               ``p = sign(p) * max(|p| - lr * wd * mask, 0)``
independent  ``p *= 1 - (lr / lr0) * wd * mask``       ``p = sign(p) * max(|p| - (lr / lr0) * wd * mask, 0)``
===========  ========================================  ===================================================

Coupled optimizers (SGD, Adam, RMSprop, Adagrad, Adamax, NAdam, RAdam, ASGD, Adadelta) add the decay to
the gradient they then transform; decoupled ones (AdamW, and Adam/NAdam/RAdam with
``decoupled_weight_decay=True``) shrink the weights directly; *independent* ones shrink them by
``lr / lr0 * wd``, where ``lr0`` is the initial learning rate, so the decay does not follow the lr's scale:
lucidrains' optimizers (``lion-pytorch``, ``adam-atan2-pytorch``'s Adopt, ...) with ``decoupled_wd=True``
(``lr0``: their constructor's ``lr``) and composer's ``Decoupled*`` optimizers (``lr0``: the group's
``initial_lr``). Other optimizers need ``decay_style`` declared: their semantics are never guessed.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence
from types import FrameType
from typing import Any, Literal, get_args

from torch.optim import ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, Optimizer, RAdam, RMSprop

from lightning_nodecay._naming import group_name
from lightning_nodecay._schema import (
    INITIAL_LR,
    LR,
    PENALTY,
    TOWARD,
    WEIGHT_DECAY,
    WEIGHT_DECAY_MULTIPLIER,
    Penalty,
    Toward,
)
from lightning_nodecay.groups import DecayDecision

#: How an optimizer applies weight decay: added to the gradient (``"coupled"``), shrinking the weights by
#: ``lr * wd`` (``"decoupled"``) or by ``lr / lr0 * wd`` (``"independent"`` of the lr's scale).
DecayStyle = Literal["coupled", "decoupled", "independent"]

_COUPLED: tuple[type[Optimizer], ...] = (SGD, RMSprop, Adagrad, Adamax, ASGD, Adadelta)
#: Optimizers whose style is given by their group's ``decoupled_weight_decay`` flag.
_FLAGGED: tuple[type[Optimizer], ...] = (Adam, NAdam, RAdam)


#: Options through which an optimizer decays parameters on its own, beyond ``weight_decay``: they must be 0 in
#: groups without decay. ASGD multiplies every parameter by ``1 - lambd * eta`` each step.
_OWN_DECAY: dict[type[Optimizer], tuple[str, ...]] = {ASGD: ("lambd",)}


def own_decay_keys(optimizer: Optimizer) -> tuple[str, ...]:
    """The group options through which ``optimizer`` decays parameters on its own (ASGD's ``lambd``).

    Examples:
        >>> import torch
        >>> own_decay_keys(torch.optim.ASGD([torch.zeros(1, requires_grad=True)])), own_decay_keys(
        ...     torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        (('lambd',), ())
    """
    return next((keys for kind, keys in _OWN_DECAY.items() if isinstance(optimizer, kind)), ())


def exclude_own_decay(optimizer: Optimizer) -> None:
    """Set the optimizer's own decay options (ASGD's ``lambd``) to 0 in groups excluded from weight decay.

    Examples:
        >>> import torch
        >>> w, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
        >>> optimizer = torch.optim.ASGD([{"params": [w]}, {"params": [b], "weight_decay_multiplier": 0.0}])
        >>> exclude_own_decay(optimizer)
        >>> [g["lambd"] for g in optimizer.param_groups]
        [0.0001, 0.0]
    """
    keys = own_decay_keys(optimizer)
    for group in optimizer.param_groups:
        if keys and group.get(WEIGHT_DECAY_MULTIPLIER, 1.0) == 0:
            group.update(dict.fromkeys(keys, 0.0))


def accepts_weight_decay(optimizer: Optimizer) -> bool:
    """Tell whether ``optimizer`` takes a ``weight_decay``: in its defaults, in every group, or in its constructor.

    Some optimizers (``pytorch_optimizer``'s Muon family) take ``weight_decay`` and apply it per group without
    listing it in ``defaults``.

    Examples:
        >>> import torch
        >>> accepts_weight_decay(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
        True
    """
    if WEIGHT_DECAY in optimizer.defaults or all(WEIGHT_DECAY in g for g in optimizer.param_groups):
        return True
    try:
        return WEIGHT_DECAY in inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def base_option(
    optimizer: Optimizer, given: Sequence[Mapping[str, Any]], key: str, multiplier_key: str
) -> float | None:
    """The base value of option ``key`` (``weight_decay``, ``lr``) of an optimizer built on the groups ``given``.

    Its default, else the value it filled into a group given without one whose multiplier (``multiplier_key``)
    is not 0; ``None`` when neither tells.

    Examples:
        >>> import torch
        >>> groups = [{"params": [torch.zeros(1, requires_grad=True)]}]
        >>> base_option(torch.optim.AdamW(groups, weight_decay=0.05), groups, "weight_decay", "weight_decay_multiplier")
        0.05
    """
    if key in optimizer.defaults:
        return float(optimizer.defaults[key])
    for group, built in zip(given, optimizer.param_groups, strict=False):
        if key not in group and group.get(multiplier_key, 1.0) and key in built:
            return float(built[key])
    return None


def needs_hook(optimizer: Optimizer, masks: Mapping[Any, Any], decisions: Iterable[DecayDecision]) -> bool:
    """Tell whether masks, L1 or toward-reference decisions, or such groups ask for the weight-decay step hook."""
    return (
        bool(masks)
        or any(d.penalty == "l1" or d.toward != "zero" for d in decisions)
        or any(g.get(PENALTY, "l2") != "l2" or g.get(TOWARD, "zero") != "zero" for g in optimizer.param_groups)
    )


def group_penalty(optimizer: Optimizer, index: int) -> Penalty:
    """The penalty of a group: ``"l1"`` for an L1 group, else ``"l2"``."""
    return _group_choice(optimizer, index, PENALTY, "l2", get_args(Penalty))  # type: ignore[return-value]


def group_toward(optimizer: Optimizer, index: int) -> Toward:
    """Where a group's decay pulls: ``"initial"`` for a group decayed toward a reference, else ``"zero"``."""
    return _group_choice(optimizer, index, TOWARD, "zero", get_args(Toward))  # type: ignore[return-value]


def _group_choice(optimizer: Optimizer, index: int, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = optimizer.param_groups[index].get(key, default)
    if value not in choices:
        raise ValueError(
            f"Group {quoted_group_name(optimizer, index)} of `{type(optimizer).__name__}` has"
            f" `{key}={value!r}`; use one of {', '.join(map(repr, choices))}."
        )
    return value


def group_style(optimizer: Optimizer, index: int, declared: DecayStyle | None) -> DecayStyle:
    """The decay semantics of a group: known for ``torch.optim`` optimizers, declared otherwise."""
    group, label = optimizer.param_groups[index], type(optimizer).__name__
    if WEIGHT_DECAY not in group:
        raise ValueError(
            f"`{label}` has no `weight_decay` option, so weight-decay masks and L1 groups cannot take"
            " its decay over. Use an optimizer with weight decay."
        )
    if group.get("fused"):
        raise ValueError(
            f"Group {quoted_group_name(optimizer, index)} of `{label}` uses `fused=True`: fused kernels unscale"
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
                ' `decay_style="decoupled"` if it shrinks weights by `lr * weight_decay` (AdamW),'
                ' or `decay_style="independent"` if by `lr / initial_lr * weight_decay`; with `NoDecayMixin` set'
                " `decay_style` on the module."
            )
        return known
    if declared not in get_args(DecayStyle):
        raise ValueError(f"`decay_style` must be 'coupled', 'decoupled' or 'independent'; got {declared!r}.")
    if known is not None and known != declared:
        raise ValueError(
            f"`decay_style={declared!r}` contradicts `{label}`, whose weight decay is {known}"
            f" (group {quoted_group_name(optimizer, index)}). Leave `decay_style` unset for `torch.optim` optimizers."
        )
    return declared


def _known_style(optimizer: Optimizer, group: Mapping[str, Any]) -> DecayStyle | None:
    kind = type(optimizer)
    if kind is AdamW or (kind in _FLAGGED and group.get("decoupled_weight_decay")):
        return "decoupled"
    if kind in _FLAGGED or kind in _COUPLED:
        return "coupled"
    flag = getattr(optimizer, "decoupled_wd", None)
    if isinstance(flag, bool) and hasattr(optimizer, "_init_lr"):
        return "independent" if flag else "decoupled"  # lucidrains' convention
    if kind.__module__.startswith("composer.") and kind.__name__.startswith("Decoupled"):
        return "independent"
    return None


def step_value(
    optimizer: Optimizer, group: Mapping[str, Any], style: DecayStyle, weight_decay: float, reference_lr: float
) -> float:
    """What the kernels apply for one group this step: ``wd`` (coupled, negated under ``maximize``), ``lr * wd``
    (decoupled) or ``lr / lr0 * wd`` (independent; ``lr0`` from the optimizer, else ``reference_lr``)."""
    if style == "coupled":
        return -weight_decay if group.get("maximize") else weight_decay
    lr = float(group[LR])
    if style == "decoupled":
        return lr * weight_decay
    initial = getattr(optimizer, "_init_lr", None) or group.get(INITIAL_LR) or reference_lr
    return lr / float(initial) * weight_decay


def unwrap_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer inside Lightning's and Fabric's wrappers (``LightningOptimizer``, ``_FabricOptimizer``)."""
    while isinstance(getattr(optimizer, "_optimizer", None), Optimizer):
        optimizer = optimizer._optimizer  # type: ignore[attr-defined]
    return optimizer


def nested_step(optimizer: Optimizer) -> bool:
    """Tell whether a step of ``optimizer`` is running already further up the stack (``super().step()``).

    torch runs step hooks in a wrapper of each class's ``step``; a subclass whose ``step`` calls its parent's
    runs them once per level. The hooks must act once per ``optimizer.step()`` call, and an exception in a step
    must not leave a counter behind, so the stack itself is asked: is there more than one running wrapper of this
    optimizer's steps?
    """
    frame: FrameType | None = sys._getframe(1)
    running = 0
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER and frame.f_locals.get("self") is optimizer:
            running += 1
            if running > 1:
                return True
        frame = frame.f_back
    return False


#: The code of the wrapper torch puts around every optimizer class's ``step`` (one code object for all).
_STEP_WRAPPER = Optimizer.profile_hook_step(lambda: None).__code__


def quoted_group_name(optimizer: Optimizer, index: int) -> str:
    return f"`{group_name(optimizer.param_groups[index], index)}`"
