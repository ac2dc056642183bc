"""Weight decay on the parameters that should have it, and not on the others, for PyTorch Lightning."""

from lightning_nodecay.groups import DecayDecision, decide, group_name, param_groups
from lightning_nodecay.mixin import LRSchedulerCallable, NoDecayMixin, OptimizerCallable
from lightning_nodecay.monitor import WeightNormMonitor
from lightning_nodecay.norms import GroupNorms, group_norms
from lightning_nodecay.plot import plot_weight_norms
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
    "DecaySummary",
    "GroupNorms",
    "GroupSummary",
    "LRSchedulerCallable",
    "NamePatterns",
    "NoDecayMixin",
    "OptimizerCallable",
    "WeightNormMonitor",
    "clean_name",
    "decide",
    "group_name",
    "group_norms",
    "norm_by_class_name",
    "param_groups",
    "plot_weight_norms",
    "split_excluded",
    "summarize",
]
