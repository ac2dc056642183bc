"""Weight decay on the parameters that should have it, and not on the others, for PyTorch Lightning."""

import importlib
from typing import TYPE_CHECKING, Any

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
from lightning_nodecay.masks import DecayStyle, WeightDecayMasks, apply_weight_decay_masks, attached_masks
from lightning_nodecay.mixin import LRSchedulerCallable, NoDecayMixin, OptimizerCallable
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

if TYPE_CHECKING:
    from lightning_nodecay.finetuning import (
        NoDecayBackboneFinetuning,
        NoDecayFinetuning,
        unfreeze_and_add_param_groups,
    )
    from lightning_nodecay.monitor import WeightNormMonitor

__version__ = "0.1.0"

#: Names whose modules import Lightning, loaded on first use so the pure-PyTorch core imports fast
#: (``from lightning_nodecay import param_groups`` needs only torch).
_LIGHTNING_GLUE = {
    "WeightNormMonitor": "lightning_nodecay.monitor",
    "NoDecayBackboneFinetuning": "lightning_nodecay.finetuning",
    "NoDecayFinetuning": "lightning_nodecay.finetuning",
    "unfreeze_and_add_param_groups": "lightning_nodecay.finetuning",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_GLUE:
        return getattr(importlib.import_module(_LIGHTNING_GLUE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_NO_DECAY_MODULE_TYPES",
    "DEFAULT_NO_DECAY_PARAM_NAMES",
    "DecayDecision",
    "DecayStyle",
    "DecaySummary",
    "GroupLayout",
    "GroupNorms",
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
    "WeightDecayMasks",
    "WeightNormMonitor",
    "apply_weight_decay_masks",
    "attached_masks",
    "clean_name",
    "compare_layouts",
    "decide",
    "group_name",
    "group_norms",
    "layout_of",
    "norm_by_class_name",
    "param_groups",
    "plot_weight_norms",
    "remap_optimizer_state",
    "remap_scheduler_state",
    "split_excluded",
    "summarize",
    "unfreeze_and_add_param_groups",
]
