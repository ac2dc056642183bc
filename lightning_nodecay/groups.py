"""Decide, once per call, how much weight decay each parameter gets, and build param groups from it.

Pure PyTorch: no Lightning import. One pass over the modules with their directly-registered parameters
gives every trainable parameter a :class:`DecayDecision`: a multiplier of the optimizer's base
``weight_decay``, a penalty and the reason for it (see :class:`~lightning_nodecay.GroupRules` for the
rules and their precedence). Groups, the summary, the safety net and the fine-tuning helpers all read these
decisions, and :func:`param_groups` is :func:`decide` followed by grouping: there is one path.

A parameter reached through several paths (tied weights, shared modules) is judged on all of them, and
the smallest proposal wins. ``weight_decay_l1`` rules switch the penalty of *decayed* parameters from L2 to
L1 (same strength), and per-element masks (:func:`~lightning_nodecay.attach_weight_decay_hook`) scale the
decay of a parameter element by element; neither overrides an exclusion.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_nodecay._layer_ids import assign_layers
from lightning_nodecay._naming import WRAPPER_SEGMENTS, clean_name, unwrap
from lightning_nodecay._patterns import NamePatterns
from lightning_nodecay._schema import (
    LR,
    LR_MULTIPLIER,
    NAME,
    PARAMS,
    PENALTY,
    TOWARD,
    WEIGHT_DECAY,
    WEIGHT_DECAY_MULTIPLIER,
    Penalty,
    Toward,
)
from lightning_nodecay._verdicts import CompiledRules, TowardVerdict, Verdict, with_l1
from lightning_nodecay.rules import GroupRules

DECAY, NO_DECAY = "decay", "no_decay"


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
        lr_multiplier: factor applied to the optimizer's base ``lr``: its layer's scale under layer decay x
            its ``lr_multipliers`` value.
        lr_reason: why, e.g. ``"layer 3 of 6 (block `blocks.2`), lr rule `head.*`"``, or ``"default"``.
        layer: its layer id under layer decay, else ``None``.
        toward: where its decay pulls it: ``"zero"``, or ``"initial"`` (its reference, see
            ``GroupRules.weight_decay_toward``); always ``"zero"`` for an excluded parameter.
        reference: its reference from a reference state dict, else ``None`` (the hook then copies the
            parameter when it is attached, or when the parameter's group is added).

    Examples:
        >>> from torch import nn
        >>> decision = decide(nn.Linear(2, 2))[1]
        >>> decision.name, decision.multiplier, decision.group
        ('bias', 0.0, 'no_decay')
    """

    name: str
    param: nn.Parameter
    multiplier: float
    reason: str
    penalty: Penalty = "l2"
    lr_multiplier: float = 1.0
    lr_reason: str = "default"
    layer: int | None = None
    toward: Toward = "zero"
    reference: Tensor | None = None

    @property
    def group(self) -> str:
        """The name of the param group this parameter goes to (when no other layer shares its lr multiplier)."""
        return decided_group_name(self.multiplier, self.penalty, self.lr_multiplier, self.toward, self.layer)


def decided_group_name(
    multiplier: float,
    penalty: Penalty = "l2",
    lr_multiplier: float = 1.0,
    toward: Toward = "zero",
    layer: int | None = None,
) -> str:
    """The name of a group of decisions: ``decay`` (1), ``no_decay`` (0), ``decay_x{m}``, ``..._l1`` for L1.

    A group decayed toward its reference (``weight_decay_toward``) ends in ``_to_init``.

    Under layer decay, ``layer{i}_`` comes first when all its parameters are in layer ``i``; otherwise
    ``_lr_x{m}`` comes last for a learning-rate multiplier other than 1. ``m`` is written with up to 6
    significant digits, or in full when that would make two different multipliers share a name. Two groups of
    one layer with different learning rates (an ``lr_multipliers`` rule inside a layer) get ``_lr_x{m}`` too,
    from :func:`groups_from_decisions`.

    Examples:
        >>> [decided_group_name(m) for m in (1.0, 0.0, 2.0, 0.1, 0.12345678)]
        ['decay', 'no_decay', 'decay_x2', 'decay_x0.1', 'decay_x0.12345678']
        >>> decided_group_name(2.0, "l1"), decided_group_name(1.0, lr_multiplier=10.0)
        ('decay_x2_l1', 'decay_lr_x10')
        >>> decided_group_name(0.5, toward="initial")
        'decay_x0.5_to_init'
        >>> decided_group_name(0.0, layer=3), decided_group_name(1.0, lr_multiplier=10.0, layer=3)
        ('layer3_no_decay', 'layer3_decay')
    """
    if multiplier == 0:
        name = NO_DECAY
    else:
        name = DECAY if multiplier == 1 else f"decay_x{_number(multiplier)}"
        name = f"{name}_l1" if penalty == "l1" else name
        name = f"{name}_to_init" if toward == "initial" else name
    if layer is not None:
        return f"layer{layer}_{name}"
    return name if lr_multiplier == 1 else f"{name}_lr_x{_number(lr_multiplier)}"


def _number(value: float) -> str:
    """``value`` with up to 6 significant digits, in full when that would round it."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def decide(module: nn.Module, rules: GroupRules | None = None) -> list[DecayDecision]:
    """Decide the weight-decay multiplier of every trainable parameter of ``module``.

    Names are matched with wrapper segments (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
    ``_orig_mod``) and wrapping modules (DDP's ``module.``, Fabric's ``_forward_module.``) removed.

    Args:
        module: the model.
        rules: the declarations; default ``GroupRules()`` (norms, PReLU and biases excluded).

    Returns:
        One :class:`DecayDecision` per trainable parameter, in ``named_parameters()`` order, each
        parameter object exactly once. Frozen parameters (``requires_grad=False``) are left out.

    Raises:
        ValueError: a declared pattern that matches no parameter (with ``rules.strict``), or an FSDP
            flat parameter.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> [(d.name, d.multiplier, d.reason) for d in decide(net)]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 1.0, 'default'), ('0.bias', 0.0, 'name pattern `bias`'),
         ('1.weight', 0.0, 'module type `LayerNorm`'), ('1.bias', 0.0, 'module type `LayerNorm`')]
    """
    compiled = CompiledRules(GroupRules() if rules is None else rules)
    decisions: dict[int, DecayDecision] = {}  # by `id(param)`: each parameter once, in the order first met
    l1: dict[int, str] = {}
    lr: dict[int, tuple[float, str] | None] = {}
    toward: dict[int, TowardVerdict | None] = {}
    declared: dict[str, str] = {}
    user_patterns = compiled.user_patterns() if compiled.strict else []
    all_names: list[str] | None = [] if user_patterns else None
    declares = _Declares()
    any_l1, any_lr, known = compiled.any_l1, compiled.any_lr, decisions.get  # locals: the loop runs per tensor
    any_toward = compiled.toward.active  # locals: the loop runs per tensor
    for prefix, owner in _owners(unwrap(module)):
        if declares[type(owner)]:
            declared.update(_declared_names(prefix, owner))
        owned = owner._parameters  # what `named_parameters(recurse=False)` reads, without its overhead
        if not owned:
            continue
        owner_rules = compiled.for_owner(owner)
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
                verdict = compiled.verdict(name, own_name, owner_rules, declared.get(name))
            key = id(param)
            seen = known(key)
            if seen is None:
                decisions[key] = DecayDecision(name, param, verdict[0], verdict[1], verdict[2])
            elif verdict[0] < seen.multiplier:  # a tied parameter: the smallest proposal of all paths wins
                seen.multiplier, seen.reason = verdict[0], f"tied to `{name}`: {verdict[1]}"
            if any_l1 and key not in l1:
                l1_rule = compiled.l1_rule(owner, name, own_name)
                if l1_rule is not None:
                    l1[key] = l1_rule
            if any_lr and key not in lr:
                lr[key] = compiled.lr_rule(owner, name, own_name)
            if any_toward and key not in toward:
                toward[key] = compiled.toward.verdict(owner, name, own_name)
    if all_names is not None:
        _check_all_patterns_match(user_patterns, all_names)
    for key, l1_rule in l1.items():
        decision = decisions[key]
        _, decision.reason, decision.penalty = with_l1(_verdict(decision), l1_rule)
    for key, proposal in lr.items():
        if proposal is not None:
            decisions[key].lr_multiplier, decisions[key].lr_reason = proposal
    if any_toward:
        _pull_toward(decisions, toward, compiled.toward.state)
    if rules is not None and rules.layer_decay is not None:
        _decay_layers(module, rules, decisions.values())
    return list(decisions.values())


def _pull_toward(
    decisions: dict[int, DecayDecision], verdicts: dict[int, TowardVerdict | None], state: dict[str, Tensor]
) -> None:
    """Give every decayed parameter the target ``weight_decay_toward`` sets for it (excluded ones stay excluded).

    Raises:
        ValueError: a reference of another shape than its parameter, or a reference state dict that names no
            decayed parameter.
    """
    for key, verdict in verdicts.items():
        decision = decisions[key]
        if verdict is None or verdict[0] == "zero" or decision.multiplier == 0:
            continue
        target, reason, reference = verdict
        if reference is not None and reference.shape != decision.param.shape:
            raise ValueError(
                f"The `weight_decay_toward` reference of `{decision.name}` has shape {tuple(reference.shape)}, the"
                f" parameter {tuple(decision.param.shape)}. Give the state dict of this model's architecture."
            )
        decision.toward, decision.reference = target, reference
        decision.reason = reason if decision.reason == "default" else f"{decision.reason}, {reason}"
    if state and not any(d.reference is not None for d in decisions.values()):
        raise ValueError(
            "The `weight_decay_toward` reference state dict names no decayed parameter of the model. Its keys must be"
            f" the model's parameter names, as `model.state_dict()` gives them{_prefix_hint(state, decisions)}."
        )


def _prefix_hint(state: dict[str, Tensor], decisions: dict[int, DecayDecision]) -> str:
    """How the keys of a reference state dict that names no parameter may differ from the names: a prefix."""
    names = [d.name for d in decisions.values() if d.multiplier]
    for key in state:
        for name in names:
            if key.endswith(f".{name}"):
                return f": its key `{key}` is parameter `{name}`, strip the prefix `{key[: -len(name)]}`"
            if name.endswith(f".{key}"):
                return f": its key `{key}` is parameter `{name}`, add the prefix `{name[: -len(key)]}`"
    return f" (e.g. `{names[0]}`); its first key is `{next(iter(state))}`" if names else ""


def _decay_layers(module: nn.Module, rules: GroupRules, decisions: Collection[DecayDecision]) -> None:
    """Scale every decision's learning rate by its layer's ``layer_decay ** (n - 1 - layer)``."""
    layers = assign_layers(module, rules.layer_ids, trainable=[d.name for d in decisions])
    scales = layers.scales(float(rules.layer_decay or 1.0))
    reasons: dict[tuple[int, str], str] = {}  # one string per layer and source, not per parameter
    for decision in decisions:
        layer, source = layers.ids[decision.name], layers.sources[decision.name]
        where = reasons.get((layer, source))
        if where is None:
            where = reasons[layer, source] = f"layer {layer} of {layers.num_layers} ({source})"
        decision.layer = layer
        decision.lr_multiplier *= scales[layer]
        decision.lr_reason = where if decision.lr_reason == "default" else f"{where}, {decision.lr_reason}"


def _verdict(decision: DecayDecision) -> Verdict:
    return decision.multiplier, decision.reason, decision.penalty


class _Declares(dict[type, bool]):
    """``{module class: whether it defines no_weight_decay()}``, filled as classes are met.

    A failed ``getattr`` raises and catches an exception: a look-up here is far cheaper.
    """

    def __missing__(self, cls: type) -> bool:
        self[cls] = declares = getattr(cls, "no_weight_decay", None) is not None
        return declares


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
            close = difflib.get_close_matches(pattern, _candidates(pattern, names), n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"`{argument}` pattern `{pattern}` matches no parameter of the model.{hint}"
                " Fix the pattern, or pass `GroupRules(..., strict=False)` (mixin: `strict = False`) if the"
                " parameter is legitimately absent from this model."
            )


def _candidates(pattern: str, names: list[str]) -> list[str]:
    """What a mistyped ``pattern`` may have meant: names, and names in its shape (its wildcard segments kept)."""
    if "." not in pattern:
        return sorted({name.rpartition(".")[2] for name in names})
    segments = pattern.split(".")
    shaped = {
        ".".join(
            segment if any(c in segment for c in "*?[") else part for segment, part in zip(segments, parts, strict=True)
        )
        for parts in (name.split(".") for name in names)
        if len(parts) == len(segments) and "**" not in segments
    }
    return sorted(shaped) + names


def param_groups(
    module: nn.Module, rules: GroupRules | None = None, *, weight_decay: float | None = None, lr: float | None = None
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into weight-decay param groups.

    Works with any ``torch.optim`` optimizer and needs no Lightning: :func:`decide`, then one group per
    distinct (multiplier, penalty).

    Args:
        module: the model.
        rules: the declarations; default ``GroupRules()`` (norms, PReLU and biases excluded).
        weight_decay: the optimizer's base ``weight_decay``; needed only to resolve multipliers
            other than 0 and 1 into explicit group values.
        lr: the optimizer's base ``lr``; needed only to resolve learning-rate multipliers (``lr_multipliers``,
            ``layer_decay``) into each group's ``lr``.

    Returns:
        Groups in a fixed order, ``decay`` first, then ``no_decay``, then multiplier groups in
        increasing order, then L1 groups in the same order; empty groups are left out. Each is a
        dict with ``"name"``, ``"params"`` (in ``named_parameters()`` order) and
        ``"weight_decay_multiplier"``. ``no_decay`` carries ``"weight_decay": 0.0``; ``decay``
        carries no ``weight_decay`` so the optimizer's own value applies. L1 groups (``decay_l1``,
        ``decay_x2_l1``, ...) carry ``"weight_decay_penalty": "l1"`` and need
        :func:`~lightning_nodecay.attach_weight_decay_hook` on the optimizer (the mixin does it); so do groups
        decayed toward a reference (``decay_to_init``, ...: ``"weight_decay_target": "initial"``), which come
        after those toward zero.

    Raises:
        TypeError: a rule of the wrong type.
        ValueError: a pattern matching nothing (with ``strict``), an FSDP flat parameter, or
            multipliers without ``weight_decay``.

    Examples:
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
    groups = groups_from_decisions(decide(module, rules))
    unresolved = [g[NAME] for g in groups if WEIGHT_DECAY not in g and g[WEIGHT_DECAY_MULTIPLIER] != 1]
    if unresolved and weight_decay is None:
        raise ValueError(
            f"Groups {unresolved} scale the optimizer's weight decay, so `param_groups` needs its base"
            " value: pass `weight_decay=` (the same value you give the optimizer), or use"
            " `NoDecayMixin`, which resolves multipliers when it builds the optimizer."
        )
    if weight_decay is not None:
        resolve_multipliers(groups, weight_decay)
    if any(g.get(LR_MULTIPLIER, 1.0) != 1 for g in groups):
        if lr is None:
            raise ValueError(
                "The rules give learning-rate multipliers (`lr_multipliers` or `layer_decay`), so `param_groups`"
                " needs the base learning rate: pass `lr=` (the same value you give the optimizer), or use"
                " `NoDecayMixin`, which resolves them when it builds the optimizer."
            )
        resolve_lr(groups, lr)
    return groups


def groups_from_decisions(decisions: Iterable[DecayDecision]) -> list[dict[str, Any]]:
    """One group per distinct (multiplier, penalty, lr multiplier, toward), in the documented order; nothing resolved.

    Order: by layer under layer decay, else the groups at the base learning rate first; then by learning-rate
    multiplier, then ``decay``, ``no_decay``, weight-decay multipliers up, L1 groups last.
    """
    by_kind: dict[_Kind, list[nn.Parameter]] = {}
    layers: dict[_Kind, int | None] = {}
    mixed = -1  # the layer of a group whose parameters are in several layers
    for decision in decisions:
        kind = (decision.multiplier, decision.penalty, decision.lr_multiplier, decision.toward)
        members = by_kind.get(kind)
        if members is None:
            members = by_kind[kind] = []
            layers[kind] = decision.layer
        elif layers[kind] != decision.layer:
            layers[kind] = mixed
        members.append(decision.param)
    shared = {kind: None if layer == mixed else layer for kind, layer in layers.items()}
    order = sorted(by_kind, key=lambda kind: _kind_order(kind, shared[kind]))
    names = _unique_names({kind: decided_group_name(*kind, layer=shared[kind]) for kind in order})
    with_lr = any(kind[2] != 1 or shared[kind] is not None for kind in order)
    groups = []
    for kind in order:
        multiplier, penalty, lr_multiplier, toward = kind
        group: dict[str, Any] = {NAME: names[kind], PARAMS: by_kind[kind], WEIGHT_DECAY_MULTIPLIER: multiplier}
        if multiplier == 0:
            group[WEIGHT_DECAY] = 0.0
        if penalty == "l1":
            group[PENALTY] = penalty
        if toward == "initial":
            group[TOWARD] = toward
        if with_lr:
            group[LR_MULTIPLIER] = lr_multiplier
        groups.append(group)
    return groups


#: A group's decision: ``(multiplier, penalty, lr multiplier, toward)``.
_Kind = tuple[float, Penalty, float, Toward]


def _kind_order(kind: _Kind, layer: int | None) -> tuple[Any, ...]:
    multiplier, penalty, lr_multiplier, toward = kind
    first = (layer, 0) if layer is not None else (-1, lr_multiplier != 1)
    return (*first, lr_multiplier, toward == "initial", *group_order((multiplier, penalty)))


def _unique_names(names: dict[_Kind, str]) -> dict[_Kind, str]:
    """Give groups that would share a name (one layer, two learning rates) an ``_lr_x{m}`` suffix."""
    counts = Counter(names.values())
    return {k: f"{n}_lr_x{_number(k[2])}" if counts[n] > 1 else n for k, n in names.items()}


def group_order(kind: tuple[float, Penalty]) -> tuple[bool, bool, bool, float]:
    """The sort key of a group of ``(multiplier, penalty)``: ``decay``, ``no_decay``, multipliers up, L1 groups last."""
    multiplier, penalty = kind
    return penalty == "l1", multiplier != 1, multiplier != 0, multiplier


def resolve_lr(groups: Iterable[dict[str, Any]], lr: float) -> None:
    """Set ``lr = lr_multiplier * lr`` on groups whose learning-rate multiplier is not 1."""
    for group in groups:
        multiplier = group.get(LR_MULTIPLIER, 1.0)
        if multiplier != 1:
            group[LR] = multiplier * lr


def resolve_multipliers(groups: Iterable[dict[str, Any]], weight_decay: float) -> None:
    """Set ``weight_decay = multiplier * weight_decay`` on groups whose multiplier is not 0 or 1."""
    for group in groups:
        multiplier = group.get(WEIGHT_DECAY_MULTIPLIER, 1.0)
        if multiplier not in (0, 1):
            group[WEIGHT_DECAY] = multiplier * weight_decay
