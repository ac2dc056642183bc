"""Decide, once per call, how much weight decay each parameter gets, and build param groups.

Pure PyTorch: no Lightning import. One pass over ``named_modules()`` with
``named_parameters(recurse=False)`` gives every trainable parameter a :class:`DecayDecision`: a
multiplier of the optimizer's base ``weight_decay`` and the reason for it. Groups, the summary,
the mixin's safety net and the fine-tuning helpers all read these decisions.

Precedence, one rule: every rule that matches a parameter proposes a multiplier (exclusions by
module type, name pattern or ``no_weight_decay()`` propose ``0``, ``weight_decay_multipliers``
propose their value); the **smallest proposal wins**, and a parameter no rule matches gets ``1``.
A parameter reached through several paths (tied weights, shared modules) is judged on all of them
the same way, so if one path says no decay, no decay wins.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    ModuleRule,
    NamePatterns,
    check_module_rules,
    clean_name,
    rule_label,
    split_module_rules,
)

MultiplierKey = Union[str, ModuleRule]  # noqa: UP007 (a runtime alias: `|` needs 3.10 types)

DECAY, NO_DECAY = "decay", "no_decay"


@dataclass
class DecayDecision:
    """How much weight decay one trainable parameter gets, and why.

    Attributes:
        name: the cleaned qualified name of the parameter (first path when it has several).
        param: the parameter itself.
        multiplier: factor applied to the optimizer's base ``weight_decay`` (0 = no decay).
        reason: the rule that decided, e.g. ``"module type `LayerNorm`"`` or ``"default"``.
    """

    name: str
    param: nn.Parameter
    multiplier: float
    reason: str

    @property
    def group(self) -> str:
        """The name of the param group this parameter goes to."""
        return group_name(self.multiplier)


def group_name(multiplier: float) -> str:
    """The stable group name of a multiplier: ``decay`` (1), ``no_decay`` (0), ``decay_x{m}``.

    Example:
        >>> [group_name(m) for m in (1.0, 0.0, 2.0, 0.1)]
        ['decay', 'no_decay', 'decay_x2', 'decay_x0.1']
    """
    if multiplier == 1:
        return DECAY
    if multiplier == 0:
        return NO_DECAY
    return f"decay_x{multiplier:g}"


class _Rules:
    """All rules of one call, validated and compiled once."""

    def __init__(
        self,
        no_decay_module_types: object,
        no_decay_param_names: object,
        weight_decay_multipliers: Mapping[MultiplierKey, float] | None,
    ) -> None:
        self.types, self.predicates = split_module_rules(check_module_rules(no_decay_module_types))
        self.patterns = NamePatterns(no_decay_param_names)
        self.multiplier_patterns, self.multiplier_modules = _check_multipliers(weight_decay_multipliers)

    def module_proposal(self, module: nn.Module) -> tuple[float, str] | None:
        """The smallest multiplier proposed for the parameters owned by ``module``."""
        if self.types and isinstance(module, self.types):
            matched = next(t for t in self.types if isinstance(module, t))
            return 0.0, f"module type `{matched.__name__}`"
        for predicate in self.predicates:
            if predicate(module):
                return 0.0, f"module rule `{rule_label(predicate)}` ({type(module).__name__})"
        best = None
        for rule, multiplier in self.multiplier_modules:
            if (isinstance(module, rule) if isinstance(rule, type) else rule(module)) and (
                best is None or multiplier < best[0]
            ):
                best = (multiplier, f"multiplier rule `{rule_label(rule)}`")
        return best

    def name_proposal(self, name: str) -> tuple[float, str] | None:
        """The smallest multiplier proposed for the parameter called ``name``."""
        pattern = self.patterns.match(name)
        if pattern is not None:
            return 0.0, f"name pattern `{pattern}`"
        best = None
        for patterns, multiplier in self.multiplier_patterns:
            hit = patterns.match(name)
            if hit is not None and (best is None or multiplier < best[0]):
                best = (multiplier, f"multiplier rule `{hit}`")
        return best


def _check_multipliers(
    multipliers: Mapping[MultiplierKey, float] | None,
) -> tuple[list[tuple[NamePatterns, float]], list[tuple[ModuleRule, float]]]:
    if multipliers is None:
        return [], []
    if not isinstance(multipliers, Mapping):
        raise TypeError(
            f"`weight_decay_multipliers` must be a dict mapping name patterns or module types to"
            f" floats, e.g. `{{'head.*': 2.0, nn.Embedding: 0.1}}`; got {multipliers!r}."
        )
    patterns, modules = [], []
    for key, value in multipliers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ValueError(
                f"`weight_decay_multipliers[{key!r}]` is {value!r}; a multiplier must be a finite"
                " float >= 0 (0 = no decay, 1 = the optimizer's `weight_decay`)."
            )
        if isinstance(key, str):
            patterns.append((NamePatterns((key,), "weight_decay_multipliers"), float(value)))
        else:
            modules.append((check_module_rules((key,), "weight_decay_multipliers")[0], float(value)))
    return patterns, modules


def decide(
    module: nn.Module,
    *,
    no_decay_module_types: Iterable[ModuleRule] = DEFAULT_NO_DECAY_MODULE_TYPES,
    no_decay_param_names: Iterable[str] = DEFAULT_NO_DECAY_PARAM_NAMES,
    weight_decay_multipliers: Mapping[MultiplierKey, float] | None = None,
    strict: bool = True,
) -> list[DecayDecision]:
    """Decide the weight-decay multiplier of every trainable parameter of ``module``.

    Arguments are those of :func:`param_groups`.

    Returns:
        One :class:`DecayDecision` per trainable parameter, in ``named_parameters()`` order, each
        parameter object exactly once. Frozen parameters (``requires_grad=False``) are left out.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> [(d.name, d.multiplier, d.reason) for d in decide(net)]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 1.0, 'default'), ('0.bias', 0.0, 'name pattern `bias`'),
         ('1.weight', 0.0, 'module type `LayerNorm`'), ('1.bias', 0.0, 'module type `LayerNorm`')]
    """
    rules = _Rules(no_decay_module_types, no_decay_param_names, weight_decay_multipliers)
    decisions: dict[int, DecayDecision] = {}
    declared: dict[str, str] = {}
    all_names: list[str] = []
    for prefix, owner in _owners(_unwrap(module)):
        declared.update(_declared_names(prefix, owner))
        module_proposal = rules.module_proposal(owner)
        for own_name, param in owner.named_parameters(recurse=False, remove_duplicate=False):
            name = f"{prefix}.{own_name}" if prefix else own_name
            all_names.append(name)
            _refuse_flat_parameter(name, param)
            if not param.requires_grad:
                continue
            proposal = _smallest(module_proposal, rules.name_proposal(name), declared.get(name))
            _record(decisions, name, param, proposal)
    if strict:
        _check_all_patterns_match(rules.patterns.patterns, all_names)
    return list(decisions.values())


def _owners(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (cleaned name, module) pair, shared modules once per path, parents before children."""
    for name, owner in root.named_modules(remove_duplicate=False):
        yield clean_name(name), owner


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip pure wrappers whose only child is ``module`` (DDP, DataParallel, DeepSpeed's engine).

    Applied repeatedly, so a model gives the same names wrapped or not.
    """
    while next(module.parameters(recurse=False), None) is None:
        children = list(module.named_children())
        if len(children) != 1 or children[0][0] != "module":
            break
        module = children[0][1]
    return module


def _declared_names(prefix: str, owner: nn.Module) -> dict[str, str]:
    hook = getattr(type(owner), "no_weight_decay", None)
    if not callable(hook):
        return {}
    names = owner.no_weight_decay()  # type: ignore[operator]
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"`{type(owner).__name__}.no_weight_decay()` must return a set of parameter names"
            f" relative to the module, e.g. `{{'pos_embed'}}`; got {names!r}."
        )
    where = f"`{prefix}.no_weight_decay()`" if prefix else "`no_weight_decay()`"
    return {clean_name(f"{prefix}.{n}" if prefix else n): f"declared by {where}" for n in names}


def _smallest(*proposals: tuple[float, str] | str | None) -> tuple[float, str]:
    """The smallest proposal (a bare string is a declaration, i.e. 0); ``1`` when none matched."""
    best: tuple[float, str] | None = None
    for proposal in proposals:
        if isinstance(proposal, str):
            proposal = (0.0, proposal)
        if proposal is not None and (best is None or proposal[0] < best[0]):
            best = proposal
    return best or (1.0, "default")


def _record(decisions: dict[int, DecayDecision], name: str, param: nn.Parameter, proposal: tuple[float, str]) -> None:
    multiplier, reason = proposal
    seen = decisions.get(id(param))
    if seen is None:
        decisions[id(param)] = DecayDecision(name, param, multiplier, reason)
    elif multiplier < seen.multiplier:
        seen.multiplier, seen.reason = multiplier, f"tied to `{name}`: {reason}"


def _refuse_flat_parameter(name: str, param: nn.Parameter) -> None:
    if type(param).__name__ == "FlatParameter" or name.rpartition(".")[2] in ("_flat_param", "flat_param"):
        raise ValueError(
            f"Parameter `{name}` is an FSDP flat parameter that merges many original parameters, so"
            " it cannot be split into decay and no-decay groups. Wrap with"
            " `FullyShardedDataParallel(..., use_orig_params=True)` (Lightning:"
            " `FSDPStrategy(use_orig_params=True)`), or use FSDP2 (`fully_shard`)."
        )


def _check_all_patterns_match(patterns: tuple[str, ...], names: list[str]) -> None:
    user_patterns = [p for p in patterns if p not in DEFAULT_NO_DECAY_PARAM_NAMES]
    for pattern in user_patterns:
        single = NamePatterns((pattern,))
        if not any(single.match(name) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`no_decay_param_names` pattern `{pattern}` matches no parameter of the model.{hint}"
                " Fix the pattern, or pass `strict=False` (mixin: `no_decay_strict = False`) if the"
                " parameter is legitimately absent from this model."
            )


def param_groups(
    module: nn.Module,
    *,
    no_decay_module_types: Iterable[ModuleRule] = DEFAULT_NO_DECAY_MODULE_TYPES,
    no_decay_param_names: Iterable[str] = DEFAULT_NO_DECAY_PARAM_NAMES,
    weight_decay_multipliers: Mapping[MultiplierKey, float] | None = None,
    weight_decay: float | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into weight-decay param groups.

    Works with any ``torch.optim`` optimizer and needs no Lightning. A parameter is excluded from
    weight decay when it is registered directly on a module matching ``no_decay_module_types``,
    when its name matches ``no_decay_param_names`` (see :class:`~lightning_nodecay.NamePatterns`),
    or when a module's ``no_weight_decay()`` method lists it (names relative to that module).
    Names are matched with wrapper segments (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
    ``_orig_mod``) and wrapping modules (DDP's ``module.``) removed.

    Args:
        module: the model.
        no_decay_module_types: ``nn.Module`` subclasses or predicates ``(module) -> bool`` whose
            directly-owned parameters get no decay. Replaces the defaults; extend them with
            ``DEFAULT_NO_DECAY_MODULE_TYPES + (nn.Embedding,)``.
        no_decay_param_names: name patterns of parameters that get no decay. Replaces the defaults.
        weight_decay_multipliers: ``{pattern or module type: multiplier}`` for decay other than
            0 or 1, e.g. ``{"head.**": 2.0, nn.Embedding: 0.1}``. The smallest proposal wins.
        weight_decay: the optimizer's base ``weight_decay``; needed only to resolve multipliers
            other than 0 and 1 into explicit group values.
        strict: raise if a user-declared name pattern (not a default one) matches no parameter.

    Returns:
        Groups in a fixed order, ``decay`` first, then ``no_decay``, then multiplier groups in
        increasing order; empty groups are left out. Each is a dict with ``"name"``, ``"params"``
        (in ``named_parameters()`` order) and ``"weight_decay_multiplier"``. ``no_decay`` carries
        ``"weight_decay": 0.0``; ``decay`` carries no ``weight_decay`` so the optimizer's own value
        applies.

    Raises:
        TypeError: a rule of the wrong type.
        ValueError: a pattern matching nothing (with ``strict``), an FSDP flat parameter, or
            multipliers without ``weight_decay``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4))
        >>> groups = param_groups(net)
        >>> [(g["name"], len(g["params"]), g.get("weight_decay")) for g in groups]
        [('decay', 1, None), ('no_decay', 4, 0.0)]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
        >>> [g["weight_decay"] for g in optimizer.param_groups]
        [0.05, 0.0]
    """
    decisions = decide(
        module,
        no_decay_module_types=no_decay_module_types,
        no_decay_param_names=no_decay_param_names,
        weight_decay_multipliers=weight_decay_multipliers,
        strict=strict,
    )
    groups = groups_from_decisions(decisions)
    unresolved = [g["name"] for g in groups if "weight_decay" not in g and g["weight_decay_multiplier"] != 1]
    if unresolved and weight_decay is None:
        raise ValueError(
            f"Groups {unresolved} scale the optimizer's weight decay, so `param_groups` needs its base"
            " value: pass `weight_decay=` (the same value you give the optimizer), or use"
            " `NoDecayMixin`, which resolves multipliers when it builds the optimizer."
        )
    if weight_decay is not None:
        resolve_multipliers(groups, weight_decay)
    return groups


def groups_from_decisions(decisions: Iterable[DecayDecision]) -> list[dict[str, Any]]:
    """Group decisions by multiplier, in the documented order; multipliers stay unresolved."""
    by_multiplier: dict[float, list[nn.Parameter]] = {}
    for decision in decisions:
        by_multiplier.setdefault(decision.multiplier, []).append(decision.param)
    order = sorted(by_multiplier, key=lambda m: (m != 1, m != 0, m))
    groups = []
    for multiplier in order:
        group: dict[str, Any] = {
            "name": group_name(multiplier),
            "params": by_multiplier[multiplier],
            "weight_decay_multiplier": multiplier,
        }
        if multiplier == 0:
            group["weight_decay"] = 0.0
        groups.append(group)
    return groups


def resolve_multipliers(groups: Iterable[dict[str, Any]], weight_decay: float) -> None:
    """Set ``weight_decay = multiplier * weight_decay`` on groups whose multiplier is not 0 or 1."""
    for group in groups:
        multiplier = group.get("weight_decay_multiplier", 1.0)
        if multiplier not in (0, 1):
            group["weight_decay"] = multiplier * weight_decay
