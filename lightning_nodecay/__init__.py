"""Weight decay on the parameters that should have it, and not on the others, for PyTorch Lightning.

The pure-PyTorch core (``param_groups``, ``decide``, the step hook, norms) imports no Lightning; the
Lightning glue (the mixin and the callbacks) is imported on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

from lightning_nodecay._layout import LayoutMismatchError
from lightning_nodecay._semantics import DecayStyle
from lightning_nodecay._shards import fsdp_shard_group
from lightning_nodecay.groups import DecayDecision, decide, param_groups
from lightning_nodecay.hook import WeightDecayHook, attach_weight_decay_hook
from lightning_nodecay.norms import GroupNorms, group_norms
from lightning_nodecay.plot import plot_weight_norms
from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    GroupRules,
    norm_by_class_name,
)
from lightning_nodecay.summary import DecaySummary, summarize

if TYPE_CHECKING:
    from lightning_nodecay.finetuning import (
        NoDecayBackboneFinetuning,
        NoDecayFinetuning,
        unfreeze_and_add_param_groups,
    )
    from lightning_nodecay.mixin import NoDecayMixin
    from lightning_nodecay.monitor import WeightNormMonitor
    from lightning_nodecay.schedule import WeightDecayScheduler

__version__ = "0.1.0"

#: Names whose modules import Lightning, loaded on first use so the pure-PyTorch core imports fast
#: (``from lightning_nodecay import param_groups`` needs only torch).
_LIGHTNING_GLUE = {
    "NoDecayMixin": "lightning_nodecay.mixin",
    "WeightNormMonitor": "lightning_nodecay.monitor",
    "NoDecayBackboneFinetuning": "lightning_nodecay.finetuning",
    "NoDecayFinetuning": "lightning_nodecay.finetuning",
    "unfreeze_and_add_param_groups": "lightning_nodecay.finetuning",
    "WeightDecayScheduler": "lightning_nodecay.schedule",
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
    "GroupNorms",
    "GroupRules",
    "LayoutMismatchError",
    "NoDecayBackboneFinetuning",
    "NoDecayFinetuning",
    "NoDecayMixin",
    "WeightDecayHook",
    "WeightDecayScheduler",
    "WeightNormMonitor",
    "attach_weight_decay_hook",
    "decide",
    "fsdp_shard_group",
    "group_norms",
    "norm_by_class_name",
    "param_groups",
    "plot_weight_norms",
    "summarize",
    "unfreeze_and_add_param_groups",
]
