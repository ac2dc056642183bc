"""Every key the library writes into a param group, an optimizer ``state_dict`` or a checkpoint.

The weight-decay decisions reach the optimizer only through these keys. No other module spells one of them
as a string literal (``tests/test_schema.py`` enforces it), so this page is the complete protocol.

Each constant below says what the key means, who writes it and who reads it. ``DECISION_KEYS`` are the
keys that belong to the current code's weight-decay decision rather than to the optimizer's trajectory: a
resumed group with a new name keeps its own values of these.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from torch import Tensor

#: Param-group key (torch's own): the group's tensors. Written by ``groups`` and fine-tuning; read everywhere.
PARAMS = "params"
#: Param-group key: the stable group name (``decay``, ``no_decay``, ``decay_x2``, ...), also used by Lightning's
#: ``LearningRateMonitor``. Written by ``groups``, the safety net and fine-tuning; read by layouts, the monitor
#: and every message.
NAME = "name"
#: Param-group key (torch's own): the learning rate. Written by fine-tuning; read by the hook (decoupled style).
LR = "lr"
#: Param-group key (torch's LR schedulers' own): the learning rate a schedule starts from. Scaled with ``lr`` by
#: the safety net and the resume when a group's learning-rate multiplier changes.
INITIAL_LR = "initial_lr"
#: Param-group key (torch's own): the decay the *optimizer* applies; 0 in hooked groups. Written by ``groups``,
#: the safety net, the hook and fine-tuning; read by the optimizer, the monitor, the safety net and the hook.
WEIGHT_DECAY = "weight_decay"
#: Param-group key: the group's factor of the base decay (0 = excluded, 1 = the base). Written by ``groups``
#: and fine-tuning; read by multiplier resolution, the summary and the resume remap.
WEIGHT_DECAY_MULTIPLIER = "weight_decay_multiplier"
#: Param-group key: the group's factor of the base learning rate (layer decay x ``lr_multipliers``), written
#: when the rules declare learning-rate multipliers. Written by ``groups``, the safety net and fine-tuning; read
#: by learning-rate resolution, the invariant, the summary and the resume remap.
LR_MULTIPLIER = "lr_multiplier"
#: Param-group key: the family of groups that share one base learning rate, for groups added after the others
#: with a learning rate of their own (the fine-tuning callbacks write the new groups' name prefix, e.g.
#: ``backbone``); absent: the family of the groups built from the rules. Read by the invariant.
LR_FAMILY = "lr_family"
#: Param-group key: the decay the step hook applies in place of the optimizer (masked and L1 groups).
#: Written by the hook; read by the hook, the monitor and the resume remap.
HOOK_WEIGHT_DECAY = "hook_weight_decay"
#: Param-group key: ``"l1"`` for an L1 group (absent: L2). Written by ``groups``; read by the hook and the summary.
PENALTY = "weight_decay_penalty"
#: Param-group key: ``"initial"`` for a group decayed toward a reference (its weights at fit start, when unfrozen,
#: or an explicit state dict's) instead of toward zero; absent: toward zero. Written by ``groups``; read by the
#: hook, the invariant, the summary and the monitor.
TOWARD = "weight_decay_target"
#: Param-group key: the share of a hooked group's elements under a per-element mask. Written by the hook; read
#: by the monitor.
MASK_SHARE = "weight_decay_mask_share"

#: Optimizer ``state_dict`` key: the masks, ``{parameter position: mask}``. Written and read by the hook.
MASKS_STATE = "weight_decay_masks"

#: Optimizer ``state_dict`` key: the references of groups decayed toward one, ``{parameter position: tensor}``.
#: Written and read by the hook.
REFERENCES_STATE = "weight_decay_references"
#: The optimizer ``state_dict`` keys that hold one entry per parameter position, moved with the optimizer's own
#: ``state`` when a resume remaps it by name.
PER_PARAMETER_STATES = (MASKS_STATE, REFERENCES_STATE)

#: Checkpoint key: one param-group layout per optimizer. Written at save and read at resume by the lifecycle.
LAYOUTS = "lightning_nodecay_layouts"
#: Checkpoint key (Lightning's own): optimizer states, rewritten in place when a resume remaps them by name.
OPTIMIZER_STATES = "optimizer_states"
#: Checkpoint key (Lightning's own): LR-scheduler states, rewritten in place with the optimizer states.
LR_SCHEDULERS = "lr_schedulers"

DECISION_KEYS = (
    WEIGHT_DECAY,
    WEIGHT_DECAY_MULTIPLIER,
    HOOK_WEIGHT_DECAY,
    PENALTY,
    TOWARD,
    MASK_SHARE,
    LR_MULTIPLIER,
)

#: The penalty of a decayed parameter: ``"l2"`` (weight decay) or ``"l1"``.
Penalty = Literal["l2", "l1"]
#: Where a decayed parameter is pulled: toward ``"zero"`` (weight decay), or its ``"initial"`` value (L2-SP).
Toward = Literal["zero", "initial"]


class ParamGroup(TypedDict, total=False):
    """A param group as the library builds it (any other optimizer option may be present too)."""

    params: list[Tensor]
    name: str
    lr: float
    initial_lr: float
    weight_decay: float
    weight_decay_multiplier: float
    hook_weight_decay: float
    weight_decay_penalty: Penalty
    weight_decay_target: Toward
    weight_decay_mask_share: float
    lr_multiplier: float
    lr_family: str
