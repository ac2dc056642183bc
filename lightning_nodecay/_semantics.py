"""How an optimizer applies weight decay, and which groups the step hook must take over. Pure PyTorch.

=========  =============================  ===============================================
style      L2 (weight decay)              L1
=========  =============================  ===============================================
coupled    ``grad += wd * mask * p``      ``grad += wd * mask * sign(p)``
decoupled  ``p *= 1 - lr * wd * mask``    ``p = sign(p) * max(|p| - lr * wd * mask, 0)``
=========  =============================  ===============================================

Coupled optimizers (SGD, Adam, RMSprop, Adagrad, Adamax, NAdam, RAdam, ASGD, Adadelta) add the decay to
the gradient they then transform; decoupled ones (AdamW, and Adam/NAdam/RAdam with
``decoupled_weight_decay=True``) shrink the weights directly. Other optimizers need ``decay_style``
declared: their semantics are never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from torch.optim import ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, Optimizer, RAdam, RMSprop

from lightning_nodecay._naming import group_name
from lightning_nodecay._schema import PENALTY, WEIGHT_DECAY, Penalty
from lightning_nodecay.groups import DecayDecision

#: How an optimizer applies weight decay: added to the gradient (``"coupled"``) or shrinking the weights
#: (``"decoupled"``).
DecayStyle = Literal["coupled", "decoupled"]

_COUPLED: tuple[type[Optimizer], ...] = (SGD, RMSprop, Adagrad, Adamax, ASGD, Adadelta)
#: Optimizers whose style is given by their group's ``decoupled_weight_decay`` flag.
_FLAGGED: tuple[type[Optimizer], ...] = (Adam, NAdam, RAdam)


def needs_hook(optimizer: Optimizer, masks: Mapping[Any, Any], decisions: Iterable[DecayDecision]) -> bool:
    """Tell whether masks, L1 decisions or L1 groups ask for the weight-decay step hook."""
    return (
        bool(masks)
        or any(d.penalty == "l1" for d in decisions)
        or any(g.get(PENALTY, "l2") != "l2" for g in optimizer.param_groups)
    )


def group_penalty(optimizer: Optimizer, index: int) -> Penalty:
    penalty = optimizer.param_groups[index].get(PENALTY, "l2")
    if penalty not in get_args(Penalty):
        raise ValueError(
            f"Group {quoted_group_name(optimizer, index)} of `{type(optimizer).__name__}` has"
            f" `{PENALTY}={penalty!r}`; use 'l2' (weight decay) or 'l1'."
        )
    return penalty


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
                ' or `decay_style="decoupled"` if it shrinks weights by `lr * weight_decay` (AdamW);'
                ' with `NoDecayMixin` set `decay_style = "coupled"` or `"decoupled"`.'
            )
        return known
    if declared not in get_args(DecayStyle):
        raise ValueError(f"`decay_style` must be 'coupled' or 'decoupled'; got {declared!r}.")
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
    return None


def quoted_group_name(optimizer: Optimizer, index: int) -> str:
    return f"`{group_name(optimizer.param_groups[index], index)}`"
