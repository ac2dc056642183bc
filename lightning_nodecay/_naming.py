"""How the library names parameters and param groups, in rules, layouts, logged keys and messages.

- A **parameter name** is its qualified name from ``named_parameters()`` with the segments that wrappers
  insert removed (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod``), after pure
  wrappers (DDP's or DeepSpeed's ``module``, Fabric's ``_forward_module``) are stripped from the root.
- A **group name** is a param group's ``"name"``, else ``pg1``, ``pg2``, ... by position, as Lightning's
  ``LearningRateMonitor`` names unnamed groups.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_nodecay._schema import NAME

#: Segments that wrappers insert into parameter names (FSDP1, activation checkpointing, ``torch.compile``).
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
#: Names of the only child of a pure wrapper module (DDP, DataParallel, DeepSpeed's engine, Fabric, and the
#: wrappers whose segments names drop anyway).
_WRAPPER_CHILDREN = frozenset({"module", "_forward_module"}) | WRAPPER_SEGMENTS


def clean_name(name: str) -> str:
    """Remove the segments that wrappers insert into a qualified parameter name.

    Examples:
        >>> clean_name("layers._fsdp_wrapped_module.0._orig_mod.norm.weight")
        'layers.0.norm.weight'
    """
    if "_wrapped_module" not in name and "_orig_mod" not in name:
        return name
    return ".".join(s for s in name.split(".") if s not in WRAPPER_SEGMENTS)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip pure wrappers whose only child is the model (DDP, DataParallel, DeepSpeed's engine, Fabric).

    Applied repeatedly, so a model gives the same names wrapped or not.

    Examples:
        >>> inner = nn.Linear(2, 2)
        >>> wrapper = nn.Module()
        >>> wrapper.module = inner
        >>> unwrap(wrapper) is inner
        True
    """
    while next(module.parameters(recurse=False), None) is None:
        children = list(module.named_children())
        if len(children) != 1 or children[0][0] not in _WRAPPER_CHILDREN:
            break
        module = children[0][1]
    return module


def param_names(module: nn.Module) -> dict[int, str]:
    """``{id(parameter): name}`` of the parameters of ``module`` (unwrapped first); tied ones by their first path.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> param_names(net)[id(net[0].bias)]
        '0.bias'
    """
    return {id(p): clean_name(n) for n, p in unwrap(module).named_parameters()}


def group_name(group: Mapping[str, Any], index: int) -> str:
    """The name of the param group at position ``index`` (from 0): its ``"name"``, else ``pg{index + 1}``.

    Unnamed groups are numbered from 1, as Lightning's ``LearningRateMonitor`` names them (``lr-SGD/pg1``), so
    a group has the same name in logged keys, checkpoint layouts and messages.

    Examples:
        >>> group_name({"params": []}, 0), group_name({"name": "no_decay", "params": []}, 1)
        ('pg1', 'no_decay')
    """
    return str(group.get(NAME, f"pg{index + 1}"))


def optimizer_prefixes(optimizers: Sequence[Any]) -> list[str]:
    """Each optimizer's prefix of logged keys: none for one, else ``SGD/``, ``SGD-1/``, ``Adam/``.

    As ``LearningRateMonitor`` names several optimizers: the class, and a counter for repeated classes.

    Examples:
        >>> import torch
        >>> w = [torch.zeros(1, requires_grad=True)]
        >>> optimizer_prefixes([torch.optim.SGD(w, lr=1), torch.optim.SGD(w, lr=1), torch.optim.Adam(w)])
        ['SGD/', 'SGD-1/', 'Adam/']
    """
    if len(optimizers) < 2:
        return [""] * len(optimizers)
    seen: Counter[str] = Counter()
    prefixes = []
    for optimizer in optimizers:
        name = type(optimizer).__name__
        prefixes.append(f"{name}/" if seen[name] == 0 else f"{name}-{seen[name]}/")
        seen[name] += 1
    return prefixes


def logged_names(optimizers: Sequence[Any], who: str) -> list[list[str]]:
    """The name of every param group in logged keys, per optimizer, as ``LearningRateMonitor`` builds them.

    A group's name (:func:`group_name`), prefixed by :func:`optimizer_prefixes` when there are several
    optimizers: ``SGD/decay``, ``SGD-1/pg1``, ``Adam/pg1``.

    Raises:
        ValueError: two groups of one optimizer share a name; ``who`` is the callback that cannot tell them apart.
    """
    names = []
    for optimizer, prefix in zip(optimizers, optimizer_prefixes(optimizers), strict=True):
        group_names = [group_name(group, i) for i, group in enumerate(optimizer.param_groups)]
        repeated = sorted({name for name in group_names if group_names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"`{who}` cannot tell apart the param groups of `{type(optimizer).__name__}` named"
                f" {', '.join(f'`{name}`' for name in repeated)}: give each group of an optimizer its own `name`."
            )
        names.append([prefix + name for name in group_names])
    return names


def listed(names: Sequence[str], quoted: bool = False, shown: int = 4) -> str:
    """The first ``shown`` names, comma-separated (in backticks if ``quoted``), then ``...`` if there are more.

    Examples:
        >>> listed(["a", "b", "c", "d", "e"], quoted=True, shown=2)
        '`a`, `b`, ...'
    """
    items = [f"`{name}`" if quoted else name for name in names[:shown]]
    return ", ".join(items + ["..."] * (len(names) > shown))
