"""A :class:`~lightning_nodecay.GroupRules` compiled once into the verdict of each parameter. Pure PyTorch.

A *verdict* is ``(multiplier, reason, penalty)``: a plain tuple, mostly shared between parameters, so a
model with many tensors builds few of them. Every rule that matches a parameter proposes a multiplier
(exclusions ``0``); the smallest proposal wins; no proposal gives ``1`` (``"default"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Union

from torch import Tensor, nn

from lightning_nodecay._patterns import NamePatterns
from lightning_nodecay._schema import Penalty, Toward
from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_PARAM_NAMES,
    GroupRules,
    ModuleRule,
    norm_by_class_name,
    rule_label,
    split_module_rules,
)

#: What a rule proposes for a parameter: ``(multiplier, reason)``.
Proposal = tuple[float, str]
#: ``(multiplier, reason, penalty)``; see the module docstring.
Verdict = tuple[float, str, Penalty]
DEFAULT: Proposal = (1.0, "default")


class OwnerRules(NamedTuple):
    """What the rules say about the parameters a module registers, before their names are known."""

    #: the smallest multiplier the module's type proposes, or ``None``
    proposal: Proposal | None
    #: ``{own parameter name: verdict}`` for verdicts decided by the proposal and the own name alone;
    #: shared by every module with the same proposal, so in a deep model a look-up decides most parameters
    memo: dict[str, Verdict]


class CompiledRules:
    """All rules of one :class:`~lightning_nodecay.GroupRules`, compiled once."""

    def __init__(self, rules: GroupRules) -> None:
        self.strict = rules.strict
        self.types, self.predicates = split_module_rules(rules.no_decay_module_types)  # type: ignore[arg-type]
        self.patterns = NamePatterns(rules.no_decay_param_names)
        multipliers = rules.weight_decay_multipliers.items()
        self.multiplier_patterns = [
            (NamePatterns((k,), "weight_decay_multipliers"), m) for k, m in multipliers if isinstance(k, str)
        ]
        self.multiplier_modules: list[tuple[ModuleRule, float]] = [
            (k, m) for k, m in multipliers if not isinstance(k, str)
        ]
        self.l1_patterns = NamePatterns([r for r in rules.weight_decay_l1 if isinstance(r, str)], "weight_decay_l1")
        self.l1_modules = tuple(r for r in rules.weight_decay_l1 if not isinstance(r, str))
        self.any_l1 = bool(rules.weight_decay_l1)
        lr_rules = rules.lr_multipliers.items()
        self.lr_patterns = [(NamePatterns((k,), "lr_multipliers"), m) for k, m in lr_rules if isinstance(k, str)]
        self.lr_modules: list[tuple[ModuleRule, float]] = [(k, m) for k, m in lr_rules if not isinstance(k, str)]
        self.any_lr = bool(rules.lr_multipliers)
        self.toward = _Toward(rules.weight_decay_toward)
        self._pattern_reasons = {p: f"name pattern `{p}`" for p in self.patterns.patterns}
        # a module's proposal depends on its class alone unless a rule is an arbitrary predicate
        module_rules = (*self.predicates, *(rule for rule, _ in self.multiplier_modules))
        self._by_class: dict[type, OwnerRules] | None = (
            {} if all(isinstance(r, type) or r is norm_by_class_name for r in module_rules) else None
        )
        self._memos: dict[Proposal | None, dict[str, Verdict]] = {}
        self._all_patterns = (self.patterns, *(patterns for patterns, _ in self.multiplier_patterns))

    def user_patterns(self) -> list[tuple[str, str]]:
        """``(pattern, argument)`` of every user-declared name pattern, for the ``strict`` check."""
        found = [(p, "no_decay_param_names") for p in self.patterns.patterns if p not in DEFAULT_NO_DECAY_PARAM_NAMES]
        found += [(p, "weight_decay_multipliers") for rule, _ in self.multiplier_patterns for p in rule.patterns]
        found += [(p, "lr_multipliers") for rule, _ in self.lr_patterns for p in rule.patterns]
        found += [(p, "weight_decay_toward") for rule, _ in self.toward.patterns for p in rule.patterns]
        return found + [(p, "weight_decay_l1") for p in self.l1_patterns.patterns]

    def l1_rule(self, module: nn.Module, name: str, leaf: str) -> str | None:
        """The label of the first ``weight_decay_l1`` rule matching the parameter, or ``None``."""
        for rule in self.l1_modules:
            if isinstance(module, rule) if isinstance(rule, type) else rule(module):
                return f"L1 rule `{rule_label(rule)}`"
        pattern = self.l1_patterns.match(name, leaf)
        return None if pattern is None else f"L1 rule `{pattern}`"

    def lr_rule(self, module: nn.Module, name: str, leaf: str) -> Proposal | None:
        """``(multiplier, reason)`` of the ``lr_multipliers`` rule matching the parameter, or ``None``.

        Raises:
            ValueError: two rules match it: which one is meant is not for the library to guess.
        """
        hits = [(m, f"`{rule_label(rule)}`") for rule, m in self.lr_modules if _matches(rule, module)]
        hits += [(m, f"`{p.patterns[0]}`") for p, m in self.lr_patterns if p.match(name, leaf)]
        if len(hits) > 1:
            raise ValueError(
                f"Parameter `{name}` matches two `lr_multipliers` rules, {hits[0][1]} (x{hits[0][0]:g}) and"
                f" {hits[1][1]} (x{hits[1][0]:g}). Give each parameter one learning-rate rule: narrow a pattern,"
                " or combine the two into one entry."
            )
        return (hits[0][0], f"lr rule {hits[0][1]}") if hits else None

    def for_owner(self, module: nn.Module) -> OwnerRules:
        """The rules for the parameters registered directly on ``module``."""
        if self._by_class is None:
            return self._owner_rules(module)
        cls = type(module)
        known = self._by_class.get(cls)
        if known is None:
            known = self._by_class[cls] = self._owner_rules(module)
        return known

    def _owner_rules(self, module: nn.Module) -> OwnerRules:
        proposal = self._module_proposal(module)
        return OwnerRules(proposal, self._memos.setdefault(proposal, {}))

    def _module_proposal(self, module: nn.Module) -> Proposal | None:
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

    def verdict(self, name: str, leaf: str, owner_rules: OwnerRules, declared: str | None) -> Verdict:
        """The smallest multiplier proposed for parameter ``name`` (own name ``leaf``), and why.

        ``owner_rules`` are those of the module that registers the parameter. On a tie the first
        reason in this order is kept: module, declaration, name pattern. The verdict is kept in the
        memo of ``owner_rules`` when nothing but their proposal and ``leaf`` decided it.
        """
        proposal, memo = owner_rules
        verdict: Verdict
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

    def _pattern_proposal(self, name: str, leaf: str, proposal: Proposal | None) -> Proposal:
        pattern = self.patterns.match(name, leaf)
        if pattern is not None:
            return 0.0, self._pattern_reasons[pattern]
        best = proposal
        for patterns, multiplier in self.multiplier_patterns:
            hit = patterns.match(name, leaf)
            if hit is not None and (best is None or multiplier < best[0]):
                best = (multiplier, f"multiplier rule `{hit}`")
        return best or DEFAULT


#: Where ``weight_decay_toward`` pulls one parameter: ``(target, reason, explicit reference or None)``.
TowardVerdict = tuple[Toward, str, Union[Tensor, None]]  # noqa: UP007 (a runtime alias)


class _Toward:
    """``weight_decay_toward`` compiled: the target of each parameter."""

    def __init__(self, toward: object) -> None:
        self.everything: Toward | None = toward if isinstance(toward, str) else None  # type: ignore[assignment]
        items = list(toward.items()) if isinstance(toward, Mapping) else []
        self.state: dict[str, Tensor] = {k: v for k, v in items if isinstance(v, Tensor)}
        rules = [(k, v) for k, v in items if not isinstance(v, Tensor)]
        self.patterns = [(NamePatterns((k,), "weight_decay_toward"), v) for k, v in rules if isinstance(k, str)]
        self.modules: list[tuple[ModuleRule, Toward]] = [(k, v) for k, v in rules if not isinstance(k, str)]
        self.active = self.everything == "initial" or bool(self.state or self.patterns or self.modules)

    def verdict(self, module: nn.Module, name: str, leaf: str) -> TowardVerdict | None:
        """Where the parameter ``name`` is pulled, when not toward zero by default.

        Raises:
            ValueError: two rules with different targets match it, or its reference has another shape.
        """
        if self.everything is not None:
            return ("initial", "toward its initial value", None) if self.everything == "initial" else None
        if self.state:
            reference = self.state.get(name)
            return None if reference is None else ("initial", "toward the reference state dict", reference)
        hits = [(t, f"`{rule_label(rule)}`") for rule, t in self.modules if _matches(rule, module)]
        hits += [(t, f"`{p.patterns[0]}`") for p, t in self.patterns if p.match(name, leaf)]
        if len({target for target, _ in hits}) > 1:
            raise ValueError(
                f"Parameter `{name}` matches two `weight_decay_toward` rules with different targets, {hits[0][1]}"
                f" ({hits[0][0]!r}) and {hits[1][1]} ({hits[1][0]!r}). Narrow a pattern so each parameter has one."
            )
        if not hits:
            return None
        target, rule = hits[0]
        return target, f"toward {'its initial value' if target == 'initial' else 'zero'} (rule {rule})", None


def _matches(rule: ModuleRule, module: nn.Module) -> bool:
    return isinstance(module, rule) if isinstance(rule, type) else bool(rule(module))


def with_l1(verdict: Verdict, rule: str) -> Verdict:
    """An L1 rule switches a decayed parameter's penalty to L1; excluded parameters stay excluded."""
    multiplier, reason, _ = verdict
    if multiplier == 0:
        return verdict
    return multiplier, rule if reason == "default" else f"{reason}, {rule}", "l1"
