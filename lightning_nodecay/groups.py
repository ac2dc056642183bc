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

Two further declarations build on the multiplier and never override it: ``weight_decay_l1`` rules
switch the penalty of *decayed* parameters from L2 to L1 (same strength: multiplier x base), and a
per-element mask (:mod:`lightning_nodecay.masks`) scales, element by element, the decay a parameter
gets; a mask on a parameter with no decay is an error.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Union

from torch import nn

from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    WRAPPER_SEGMENTS,
    ModuleRule,
    NamePatterns,
    check_module_rules,
    clean_name,
    norm_by_class_name,
    rule_label,
    split_module_rules,
)

MultiplierKey = Union[str, ModuleRule]  # noqa: UP007 (a runtime alias: `|` needs 3.10 types)
#: The penalty of a decayed parameter: ``"l2"`` (weight decay) or ``"l1"`` (see :mod:`lightning_nodecay.masks`).
Penalty = Literal["l2", "l1"]

DECAY, NO_DECAY = "decay", "no_decay"
#: What a rule proposes for a parameter: ``(multiplier, reason)``.
_Proposal = tuple[float, str]
#: A :class:`DecayDecision` without name and parameter: ``(multiplier, reason, penalty)``. Verdicts
#: are plain tuples, mostly shared between parameters: `param_groups` builds no object per parameter.
_Verdict = tuple[float, str, Penalty]
_DEFAULT = (1.0, "default")
#: The param-group key that asks for an L1 penalty instead of L2: ``{"weight_decay_penalty": "l1"}``.
PENALTY_KEY = "weight_decay_penalty"


class _OwnerRules(NamedTuple):
    """What the rules say about the parameters a module registers, before their names are known."""

    #: the smallest multiplier the module's type proposes, or ``None``
    proposal: _Proposal | None
    #: ``{own parameter name: verdict}`` for verdicts decided by the proposal and the own name alone;
    #: shared by every module with the same proposal, so in a deep model a look-up decides most parameters
    memo: dict[str, _Verdict]


@dataclass(slots=True)
class DecayDecision:
    """How much weight decay one trainable parameter gets, and why.

    Attributes:
        name: the cleaned qualified name of the parameter (first path when it has several).
        param: the parameter itself.
        multiplier: factor applied to the optimizer's base ``weight_decay`` (0 = no decay).
        reason: the rule that decided, e.g. ``"module type `LayerNorm`"`` or ``"default"``.
        penalty: ``"l2"`` (weight decay), or ``"l1"`` when a ``weight_decay_l1`` rule matched a
            decayed parameter.
    """

    name: str
    param: nn.Parameter
    multiplier: float
    reason: str
    penalty: Penalty = "l2"

    @property
    def group(self) -> str:
        """The name of the param group this parameter goes to."""
        return group_name(self.multiplier, self.penalty)


def group_name(multiplier: float, penalty: Penalty = "l2") -> str:
    """The stable, unique group name of a multiplier: ``decay`` (1), ``no_decay`` (0), ``decay_x{m}``.

    L1 groups end in ``_l1``. ``m`` is written with up to 6 significant digits, or in full when
    that would make two different multipliers share a name.

    Example:
        >>> [group_name(m) for m in (1.0, 0.0, 2.0, 0.1, 0.12345678)]
        ['decay', 'no_decay', 'decay_x2', 'decay_x0.1', 'decay_x0.12345678']
        >>> group_name(2.0, "l1")
        'decay_x2_l1'
    """
    if multiplier == 0:
        return NO_DECAY
    short = f"{multiplier:g}"
    name = DECAY if multiplier == 1 else f"decay_x{short if float(short) == multiplier else repr(multiplier)}"
    return f"{name}_l1" if penalty == "l1" else name


class _Rules:
    """All rules of one call, validated and compiled once."""

    def __init__(
        self,
        no_decay_module_types: object,
        no_decay_param_names: object,
        weight_decay_multipliers: Mapping[MultiplierKey, float] | None,
        weight_decay_l1: Iterable[MultiplierKey] = (),
    ) -> None:
        self.types, self.predicates = split_module_rules(check_module_rules(no_decay_module_types))
        self.patterns = NamePatterns(no_decay_param_names)
        self.multiplier_patterns, self.multiplier_modules = _check_multipliers(weight_decay_multipliers)
        self.l1_patterns, self.l1_modules = _check_l1(weight_decay_l1)
        self._pattern_reasons = {p: f"name pattern `{p}`" for p in self.patterns.patterns}
        # a module's proposal depends on its class alone unless a rule is an arbitrary predicate
        rules = (*self.predicates, *(rule for rule, _ in self.multiplier_modules))
        self._by_class: dict[type, _OwnerRules] | None = (
            {} if all(isinstance(r, type) or r is norm_by_class_name for r in rules) else None
        )
        self._memos: dict[_Proposal | None, dict[str, _Verdict]] = {}
        self._all_patterns = (self.patterns, *(patterns for patterns, _ in self.multiplier_patterns))

    def user_patterns(self) -> list[tuple[str, str]]:
        """``(pattern, argument)`` of every user-declared name pattern, for the ``strict`` check."""
        found = [(p, "no_decay_param_names") for p in self.patterns.patterns if p not in DEFAULT_NO_DECAY_PARAM_NAMES]
        found += [(p, "weight_decay_multipliers") for rule, _ in self.multiplier_patterns for p in rule.patterns]
        return found + [(p, "weight_decay_l1") for p in self.l1_patterns.patterns]

    def l1_proposal(self, module: nn.Module, name: str, leaf: str) -> str | None:
        """The label of the first ``weight_decay_l1`` rule matching the parameter, or ``None``."""
        for rule in self.l1_modules:
            if isinstance(module, rule) if isinstance(rule, type) else rule(module):
                return f"L1 rule `{rule_label(rule)}`"
        pattern = self.l1_patterns.match(name, leaf)
        return None if pattern is None else f"L1 rule `{pattern}`"

    def for_owner(self, module: nn.Module) -> _OwnerRules:
        """The rules for the parameters registered directly on ``module``."""
        if self._by_class is None:
            return self._owner_rules(module)
        cls = type(module)
        known = self._by_class.get(cls)
        if known is None:
            known = self._by_class[cls] = self._owner_rules(module)
        return known

    def _owner_rules(self, module: nn.Module) -> _OwnerRules:
        proposal = self._module_proposal(module)
        return _OwnerRules(proposal, self._memos.setdefault(proposal, {}))

    def _module_proposal(self, module: nn.Module) -> _Proposal | None:
        if self.types and isinstance(module, self.types):
            return 0.0, f"module type `{type(module).__name__}`"
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

    def verdict(
        self,
        name: str,
        leaf: str,
        owner_rules: _OwnerRules,
        declared: str | None,
    ) -> _Verdict:
        """The smallest multiplier proposed for parameter ``name`` (own name ``leaf``), and why.

        ``owner_rules`` are those of the module that registers the parameter. On a tie the first
        reason in this order is kept: module, declaration, name pattern. The verdict is kept in the
        memo of ``owner_rules`` when nothing but their proposal and ``leaf`` decided it.
        """
        proposal, memo = owner_rules
        verdict: _Verdict
        if proposal is not None and proposal[0] == 0:  # nothing can go lower
            verdict = memo[leaf] = (proposal[0], proposal[1], "l2")
            return verdict
        if declared is not None:
            return 0.0, declared, "l2"
        multiplier, reason = self._pattern_proposal(name, leaf, proposal)
        verdict = (multiplier, reason, "l2")
        if all(patterns.decided_by_leaf(leaf) for patterns in self._all_patterns):
            memo[leaf] = verdict
        return verdict

    def _pattern_proposal(self, name: str, leaf: str, proposal: _Proposal | None) -> _Proposal:
        pattern = self.patterns.match(name, leaf)
        if pattern is not None:
            return 0.0, self._pattern_reasons[pattern]
        best = proposal
        for patterns, multiplier in self.multiplier_patterns:
            hit = patterns.match(name, leaf)
            if hit is not None and (best is None or multiplier < best[0]):
                best = (multiplier, f"multiplier rule `{hit}`")
        return best or _DEFAULT


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


def _check_l1(rules: Iterable[MultiplierKey]) -> tuple[NamePatterns, tuple[ModuleRule, ...]]:
    if isinstance(rules, (str, type)) or not isinstance(rules, Iterable):
        raise TypeError(
            f"`weight_decay_l1` must be a tuple of name patterns or module types whose parameters get an"
            f" L1 penalty, e.g. `('head.*', nn.Embedding)`; got {rules!r}. Wrap a single rule in a tuple."
        )
    rules = tuple(rules)
    patterns = NamePatterns([r for r in rules if isinstance(r, str)], "weight_decay_l1")
    return patterns, check_module_rules([r for r in rules if not isinstance(r, str)], "weight_decay_l1")


def decide(
    module: nn.Module,
    *,
    no_decay_module_types: Iterable[ModuleRule] = DEFAULT_NO_DECAY_MODULE_TYPES,
    no_decay_param_names: Iterable[str] = DEFAULT_NO_DECAY_PARAM_NAMES,
    weight_decay_multipliers: Mapping[MultiplierKey, float] | None = None,
    weight_decay_l1: Iterable[MultiplierKey] = (),
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
    rules = _Rules(no_decay_module_types, no_decay_param_names, weight_decay_multipliers, weight_decay_l1)
    names, params, verdicts = _judge(module, rules, strict, with_names=True)
    return [DecayDecision(name, param, *verdict) for name, param, verdict in zip(names, params, verdicts, strict=True)]


class _Judged(NamedTuple):
    """The trainable parameters of a module, each once, in ``named_parameters()`` order, with verdicts."""

    names: list[str]
    params: list[nn.Parameter]
    verdicts: Collection[_Verdict]


def _judge(module: nn.Module, rules: _Rules, strict: bool, with_names: bool) -> _Judged:
    """What :func:`decide` returns, as parallel sequences; ``names`` stays empty unless ``with_names``.

    :func:`param_groups` needs no names: keeping a string per parameter alive would cost it time.
    """
    verdicts: dict[int, _Verdict] = {}  # by `id(param)`: each parameter once, in the order first met
    params: list[nn.Parameter] = []
    names: list[str] = []
    l1: dict[int, str] = {}
    declared: dict[str, str] = {}
    user_patterns = rules.user_patterns() if strict else []
    all_names: list[str] | None = [] if user_patterns else None
    any_l1 = bool(rules.l1_modules or rules.l1_patterns.patterns)
    declares = _Declares()
    for prefix, owner in _owners(_unwrap(module)):
        if declares[type(owner)]:
            declared.update(_declared_names(prefix, owner))
        owned = owner._parameters  # what `named_parameters(recurse=False)` reads, without its overhead
        if not owned:
            continue
        owner_rules = rules.for_owner(owner)
        memo = owner_rules.memo
        for own_name, param in owned.items():
            if param is None:
                continue
            name = prefix + own_name
            if all_names is not None:
                all_names.append(name)
            if own_name in _FLAT_PARAMETER_NAMES:
                _refuse_flat_parameter(name)
            if not param.requires_grad:
                continue
            verdict = memo.get(own_name)  # most parameters: a dict look-up instead of matching rules
            if verdict is None or name in declared:
                verdict = rules.verdict(name, own_name, owner_rules, declared.get(name))
            key = id(param)
            seen = verdicts.get(key)
            if seen is None:
                verdicts[key] = verdict
                params.append(param)
                if with_names:
                    names.append(name)
            elif verdict[0] < seen[0]:  # a tied parameter: the smallest proposal of all paths wins
                verdicts[key] = (verdict[0], f"tied to `{name}`: {verdict[1]}", "l2")
            if any_l1 and key not in l1:
                l1_rule = rules.l1_proposal(owner, name, own_name)
                if l1_rule is not None:
                    l1[key] = l1_rule
    if all_names is not None:
        _check_all_patterns_match(user_patterns, all_names)
    for key, l1_rule in l1.items():
        verdicts[key] = _use_l1(verdicts[key], l1_rule)
    return _Judged(names, params, verdicts.values())


class _Declares(dict[type, bool]):
    """``{module class: whether it defines no_weight_decay()}``, filled as classes are met.

    A failed ``getattr`` raises and catches an exception: a look-up here is far cheaper.
    """

    def __missing__(self, cls: type) -> bool:
        self[cls] = declares = getattr(cls, "no_weight_decay", None) is not None
        return declares


def _use_l1(verdict: _Verdict, rule: str) -> _Verdict:
    """An L1 rule switches a decayed parameter's penalty to L1; excluded parameters stay excluded."""
    multiplier, reason, _ = verdict
    if multiplier == 0:
        return verdict
    return multiplier, rule if reason == "default" else f"{reason}, {rule}", "l1"


def _owners(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (cleaned name prefix, module) pair, parents before children, shared modules once per path.

    The order is that of ``named_modules()``. A prefix is ``""`` for the root, else the module's
    name and a dot; wrapper segments are dropped as the walk goes, so no name is split and rejoined.
    """
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, owner = stack.pop()
        yield prefix, owner
        children = owner._modules
        if children:  # most modules are leaves: skip building a reversed view of nothing
            for name, child in reversed(children.items()):
                if child is not None:
                    stack.append((prefix if name in WRAPPER_SEGMENTS else f"{prefix}{name}.", child))


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
    """``{cleaned qualified name: reason}`` of what ``owner.no_weight_decay()`` declares (timm's convention)."""
    names = owner.no_weight_decay()  # type: ignore[operator]
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"`{type(owner).__name__}.no_weight_decay()` must return a set of parameter names"
            f" relative to the module, e.g. `{{'pos_embed'}}`; got {names!r}."
        )
    reason = f"declared by `{prefix}no_weight_decay()`"
    return {prefix + clean_name(name): reason for name in names}


_FLAT_PARAMETER_NAMES = frozenset({"_flat_param", "flat_param"})


def _refuse_flat_parameter(name: str) -> None:
    raise ValueError(
        f"Parameter `{name}` is an FSDP flat parameter that merges many original parameters, so"
        " it cannot be split into decay and no-decay groups. Wrap with"
        " `FullyShardedDataParallel(..., use_orig_params=True)` (Lightning:"
        " `FSDPStrategy(use_orig_params=True)`), or use FSDP2 (`fully_shard`)."
    )


def _check_all_patterns_match(patterns: list[tuple[str, str]], names: list[str]) -> None:
    for pattern, argument in patterns:
        single = NamePatterns((pattern,), argument)
        if not any(single.match(name) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`{argument}` pattern `{pattern}` matches no parameter of the model.{hint}"
                " Fix the pattern, or pass `strict=False` (mixin: `no_decay_strict = False`) if the"
                " parameter is legitimately absent from this model."
            )


def param_groups(
    module: nn.Module,
    *,
    no_decay_module_types: Iterable[ModuleRule] = DEFAULT_NO_DECAY_MODULE_TYPES,
    no_decay_param_names: Iterable[str] = DEFAULT_NO_DECAY_PARAM_NAMES,
    weight_decay_multipliers: Mapping[MultiplierKey, float] | None = None,
    weight_decay_l1: Iterable[MultiplierKey] = (),
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
        weight_decay_l1: name patterns or module rules whose decayed parameters get an L1 penalty
            (strength: their multiplier x the base ``weight_decay``) instead of L2. Their groups
            (``decay_l1``, ``decay_x2_l1``, ...) carry ``"weight_decay_penalty": "l1"`` and need
            :func:`~lightning_nodecay.masks.apply_weight_decay_masks` on the optimizer (the mixin
            does it); plain ``torch.optim`` ignores that key and would apply L2.
        weight_decay: the optimizer's base ``weight_decay``; needed only to resolve multipliers
            other than 0 and 1 into explicit group values.
        strict: raise if a user-declared name pattern (not a default one) matches no parameter.

    Returns:
        Groups in a fixed order, ``decay`` first, then ``no_decay``, then multiplier groups in
        increasing order, then L1 groups in the same order; empty groups are left out. Each is a
        dict with ``"name"``, ``"params"`` (in ``named_parameters()`` order) and
        ``"weight_decay_multiplier"``. ``no_decay`` carries ``"weight_decay": 0.0``; ``decay``
        carries no ``weight_decay`` so the optimizer's own value applies.

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
    rules = _Rules(no_decay_module_types, no_decay_param_names, weight_decay_multipliers, weight_decay_l1)
    _, params, verdicts = _judge(module, rules, strict, with_names=False)
    groups = _groups_from_verdicts(params, verdicts)
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
    """Group decisions by multiplier and penalty, in the documented order; multipliers stay unresolved."""
    by_kind: dict[tuple[float, Penalty], list[nn.Parameter]] = {}
    for decision in decisions:
        by_kind.setdefault((decision.multiplier, decision.penalty), []).append(decision.param)
    return _ordered_groups(by_kind)


def _groups_from_verdicts(params: Iterable[nn.Parameter], verdicts: Iterable[_Verdict]) -> list[dict[str, Any]]:
    """Group parameters by the multiplier and penalty of their verdicts, like :func:`groups_from_decisions`."""
    by_kind: dict[tuple[float, Penalty], list[nn.Parameter]] = {}
    by_verdict: dict[_Verdict, list[nn.Parameter]] = {}  # few distinct verdicts: no tuple built per parameter
    for param, verdict in zip(params, verdicts, strict=True):
        members = by_verdict.get(verdict)
        if members is None:
            members = by_verdict[verdict] = by_kind.setdefault((verdict[0], verdict[2]), [])
        members.append(param)
    return _ordered_groups(by_kind)


def _ordered_groups(by_kind: dict[tuple[float, Penalty], list[nn.Parameter]]) -> list[dict[str, Any]]:
    """Param groups from ``{(multiplier, penalty): parameters}``, in the documented order."""
    order = sorted(by_kind, key=lambda kind: (kind[1] == "l1", kind[0] != 1, kind[0] != 0, kind[0]))
    groups = []
    for multiplier, penalty in order:
        group: dict[str, Any] = {
            "name": group_name(multiplier, penalty),
            "params": by_kind[multiplier, penalty],
            "weight_decay_multiplier": multiplier,
        }
        if multiplier == 0:
            group["weight_decay"] = 0.0
        if penalty == "l1":
            group[PENALTY_KEY] = "l1"
        groups.append(group)
    return groups


def resolve_multipliers(groups: Iterable[dict[str, Any]], weight_decay: float) -> None:
    """Set ``weight_decay = multiplier * weight_decay`` on groups whose multiplier is not 0 or 1."""
    for group in groups:
        multiplier = group.get("weight_decay_multiplier", 1.0)
        if multiplier not in (0, 1):
            group["weight_decay"] = multiplier * weight_decay
