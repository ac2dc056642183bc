"""Weight decay on the parameters that should have it, and not on the others, for PyTorch Lightning."""

from lightning_nodecay.groups import DecayDecision, decide, group_name, param_groups
from lightning_nodecay.masks import DecayStyle, WeightDecayMasks, apply_weight_decay_masks, attached_masks
from lightning_nodecay.mixin import LRSchedulerCallable, NoDecayMixin, OptimizerCallable
from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    NamePatterns,
    clean_name,
    norm_by_class_name,
)
from lightning_nodecay.safety_net import split_excluded
from lightning_nodecay.summary import DecaySummary, GroupSummary, summarize

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NO_DECAY_MODULE_TYPES",
    "DEFAULT_NO_DECAY_PARAM_NAMES",
    "DecayDecision",
    "DecayStyle",
    "DecaySummary",
    "GroupSummary",
    "LRSchedulerCallable",
    "NamePatterns",
    "NoDecayMixin",
    "OptimizerCallable",
    "WeightDecayMasks",
    "apply_weight_decay_masks",
    "attached_masks",
    "clean_name",
    "decide",
    "group_name",
    "norm_by_class_name",
    "param_groups",
    "split_excluded",
    "summarize",
]
