"""Weight decay on the parameters that should have it, and not on the others, for PyTorch Lightning."""

from lightning_nodecay.finetuning import (
    NoDecayBackboneFinetuning,
    NoDecayFinetuning,
    unfreeze_and_add_param_groups,
)
from lightning_nodecay.groups import DecayDecision, decide, group_name, param_groups
from lightning_nodecay.layout import (
    GroupLayout,
    Layout,
    LayoutDiff,
    LayoutMismatchError,
    compare_layouts,
    layout_of,
    remap_optimizer_state,
    remap_scheduler_state,
)
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
    "DecaySummary",
    "GroupLayout",
    "GroupSummary",
    "LRSchedulerCallable",
    "Layout",
    "LayoutDiff",
    "LayoutMismatchError",
    "NamePatterns",
    "NoDecayBackboneFinetuning",
    "NoDecayFinetuning",
    "NoDecayMixin",
    "OptimizerCallable",
    "clean_name",
    "compare_layouts",
    "decide",
    "group_name",
    "layout_of",
    "norm_by_class_name",
    "param_groups",
    "remap_optimizer_state",
    "remap_scheduler_state",
    "split_excluded",
    "summarize",
    "unfreeze_and_add_param_groups",
]
