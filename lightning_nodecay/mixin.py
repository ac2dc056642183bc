"""``NoDecayMixin``: a LightningModule mixin that builds decay / no-decay param groups from declarations.

The mixin keeps the declarations, :meth:`~NoDecayMixin.configure_param_groups` and
:meth:`~NoDecayMixin.configure_optimizers`. Everything that happens during a fit (safety net, step hook,
resume check, summary, the invariant before every step) is done by the callback it returns from
``configure_callbacks()`` (see ``_lifecycle.py``), so overriding the module's own hooks cannot switch it off.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_nodecay._checkpoint import LayoutPolicy
from lightning_nodecay._lifecycle import FitLifecycle, _as_module, attach_declared_hook
from lightning_nodecay._naming import group_name, listed, param_names
from lightning_nodecay._schema import LR, LR_MULTIPLIER, NAME, PARAMS, WEIGHT_DECAY, WEIGHT_DECAY_MULTIPLIER
from lightning_nodecay._semantics import DecayStyle, accepts_weight_decay, base_option, exclude_own_decay
from lightning_nodecay.groups import DecayDecision, decide, groups_from_decisions, resolve_lr, resolve_multipliers
from lightning_nodecay.rules import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    GroupRules,
    LayerIds,
    ModuleRule,
    RuleKey,
    TowardRules,
)
from lightning_nodecay.summary import DecaySummary, summarize

#: What LightningCLI injects for an ``optimizer: OptimizerCallable`` argument.
OptimizerCallable = Callable[[Iterable], Optimizer]
#: What LightningCLI injects for an ``lr_scheduler: LRSchedulerCallable`` argument.
LRSchedulerCallable = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]  # noqa: UP007 (runtime alias)

#: The class attributes that declare rules: the simple way to declare them (defaults: those of `GroupRules`).
_RULE_ATTRIBUTES = (
    "no_decay_module_types",
    "no_decay_param_names",
    "weight_decay_multipliers",
    "weight_decay_l1",
    "lr_multipliers",
    "layer_decay",
    "layer_ids",
    "weight_decay_toward",
    "strict",
)
_DEFAULT_RULES = GroupRules()


class NoDecayMixin:
    """Give a LightningModule decay / no-decay param groups, with no hand-written groups.

    Inherit it *before* the LightningModule base. Declare the optimizer as a callable that takes
    param groups (``functools.partial(torch.optim.AdamW, lr=..., weight_decay=...)``, or
    LightningCLI's ``OptimizerCallable``) in ``self.optimizer``; the mixin's
    :meth:`configure_optimizers` passes it the groups of :meth:`configure_param_groups`. The
    optimizer's own ``weight_decay`` applies to the ``decay`` group; ``no_decay`` gets ``0.0``.

    Declare the rules as class attributes (the simple way), or as one :class:`~lightning_nodecay.GroupRules`
    in ``self.group_rules`` (an ``__init__`` argument LightningCLI can fill from YAML); not both.

    During a fit, a callback the mixin returns from ``configure_callbacks()`` (merged by Lightning with the
    Trainer's) keeps the decisions true: at fit start a safety net moves excluded parameters out of any
    decayed group, whoever built the optimizer, the masks and L1 groups get their step hook, and a summary
    of the groups is logged on rank zero; before every optimizer step it checks the weight-decay invariant
    (every parameter's effective decay is base x its multiplier, excluded ones exactly 0) and raises before a
    wrong step. Overriding ``on_fit_start`` and the other hooks without ``super()`` changes none of this.

    Checkpoints record the param-group layout of every optimizer (group names and parameter names).
    On resume the layout is compared with the optimizer's, after the safety net; if it changed, the
    saved optimizer state is moved to the current groups by parameter name and every move is
    logged (``on_layout_change = "remap"``, the default), or the resume is refused with a list of the
    differences (``on_layout_change = "error"``). Remap is the default because it gives each
    parameter exactly the state it would have had, which is what a changed exclusion or an upgrade
    needs; choose ``"error"`` to make any change of the groups a deliberate decision.

    Attributes:
        group_rules: all rules as one value; when set, the rule attributes below must keep their defaults.
        no_decay_module_types: module classes or predicates whose own parameters get no decay.
        no_decay_param_names: name patterns of parameters that get no decay.
        weight_decay_multipliers: ``{pattern or module type: multiplier}`` of the base decay.
        weight_decay_l1: patterns or module types whose decayed parameters get an L1 penalty
            instead of L2 (see :func:`~lightning_nodecay.attach_weight_decay_hook`).
        lr_multipliers: ``{pattern or module type: multiplier}`` of the base learning rate.
        layer_decay: layer-wise learning-rate decay (see :class:`~lightning_nodecay.GroupRules`).
        layer_ids: the model's own layer ids for ``layer_decay``: ``{name pattern: id}`` or ``(name) -> id``.
        weight_decay_toward: ``"zero"``, ``"initial"`` (L2-SP: toward the weights at fit start), per-rule targets
            ``{pattern or module type: "initial" | "zero"}``, or a reference state dict (see
            :class:`~lightning_nodecay.GroupRules`).
        strict: raise when a declared name pattern matches no parameter.
        decay_style: ``"coupled"`` or ``"decoupled"``: how ``self.optimizer`` applies weight
            decay; needed for masks and L1 with optimizers outside ``torch.optim``.
        check_weight_decay: check before every optimizer step that every parameter gets the weight decay the
            rules declare (see ``docs/architecture.md``); ``False`` if you deliberately manage decay yourself.
        log_weight_decay_summary: log the group summary at fit start.
        optimizer: callable ``(param_groups) -> Optimizer``.
        lr_scheduler: optional callable ``(optimizer) -> LRScheduler``.
        lr_scheduler_config: Lightning's scheduler options, e.g. ``{"interval": "step"}`` or
            ``{"monitor": "val_loss"}``.
        on_layout_change: what to do when resuming with param groups that differ from the
            checkpoint's: ``"remap"`` the optimizer state by parameter name, or raise (``"error"``).

    Examples:
        >>> import functools, torch
        >>> import pytorch_lightning as pl
        >>> from torch import nn
        >>> class Net(NoDecayMixin, pl.LightningModule):
        ...     no_decay_param_names = DEFAULT_NO_DECAY_PARAM_NAMES + ("pos_embed",)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.pos_embed = nn.Parameter(torch.zeros(4))
        ...         self.layer = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        ...         self.optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
        >>> optimizer = Net().configure_optimizers()
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
        [('decay', 1, 0.05), ('no_decay', 4, 0.0)]
    """

    group_rules: GroupRules | None = None
    no_decay_module_types: Sequence[ModuleRule | str] = DEFAULT_NO_DECAY_MODULE_TYPES
    no_decay_param_names: Sequence[str] = DEFAULT_NO_DECAY_PARAM_NAMES
    weight_decay_multipliers: Mapping[RuleKey, float] = {}
    weight_decay_l1: Sequence[RuleKey] = ()
    lr_multipliers: Mapping[RuleKey, float] = {}
    layer_decay: float | None = None
    layer_ids: LayerIds | None = None
    weight_decay_toward: TowardRules = "zero"
    strict: bool = True
    decay_style: DecayStyle | None = None
    check_weight_decay: bool = True
    log_weight_decay_summary: bool = True
    optimizer: OptimizerCallable | None = None
    lr_scheduler: LRSchedulerCallable | None = None
    lr_scheduler_config: Mapping[str, Any] = {}
    on_layout_change: LayoutPolicy = "remap"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Keep the fit-lifecycle callback in a subclass's own ``configure_callbacks`` (with or without ``super()``)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_callbacks")
        if own is not None and not getattr(own, "_nodecay_keeps_lifecycle", False):
            cls.configure_callbacks = _keeping_lifecycle(own)  # type: ignore[method-assign,assignment]

    def configure_group_rules(self) -> GroupRules:
        """The rules the groups are built from: ``self.group_rules``, else the rule attributes. Override to customise.

        Raises:
            ValueError: ``group_rules`` is set and a rule attribute was changed too.
        """
        rules = self.group_rules
        declared = GroupRules(**{name: getattr(self, name) for name in _RULE_ATTRIBUTES})
        changed = [name for name in _RULE_ATTRIBUTES if getattr(declared, name) != getattr(_DEFAULT_RULES, name)]
        if rules is None:
            return declared
        if changed:
            raise ValueError(
                f"`{type(self).__name__}` declares rules twice: in `group_rules` and in {listed(changed, True)}."
                " Declare them in one place: move the attributes into `GroupRules(...)`, or leave `group_rules` unset."
            )
        if not isinstance(rules, GroupRules):
            raise TypeError(
                f"`{type(self).__name__}.group_rules` must be a `lightning_nodecay.GroupRules`; got"
                f" {type(rules).__name__}. Build one: `GroupRules(no_decay_param_names=(...))`."
            )
        return rules

    def weight_decay_decisions(self) -> list[DecayDecision]:
        """The multiplier and reason of every trainable parameter, from the declarations.

        During a fit they are computed once (again only when the trainable parameters change).
        """
        lifecycle = self._lifecycle()
        if lifecycle is not None:
            return lifecycle.decisions(self)
        return decide(_as_module(self), self.configure_group_rules())

    def weight_decay_masks(self) -> dict[str, Tensor]:
        """Per-element weight-decay multipliers, ``{parameter name: tensor}``. Override to declare masks.

        Names are those of :meth:`weight_decay_decisions`. A mask scales the decay of its
        parameter element by element (same shape, or broadcastable such as one value per output
        row); see :func:`~lightning_nodecay.attach_weight_decay_hook`. Called when the
        optimizer is built; a resumed checkpoint's masks replace the returned ones.
        """
        return {}

    def weight_decay_summary(self) -> DecaySummary:
        """What goes in which group and why, as data (``print()`` it for a table)."""
        return summarize(self.weight_decay_decisions(), self.weight_decay_masks())

    def configure_param_groups(self) -> list[dict[str, Any]]:
        """Build the param groups handed to ``self.optimizer``. Override to customise.

        Returns:
            ``decay`` first, then ``no_decay``, then multiplier groups, each with ``"name"``,
            ``"params"`` and ``"weight_decay_multiplier"``, as :func:`~lightning_nodecay.param_groups`.
        """
        return groups_from_decisions(self.weight_decay_decisions())

    def configure_optimizers(self) -> Any:
        """Build ``self.optimizer`` (and ``self.lr_scheduler``) on the groups of :meth:`configure_param_groups`.

        Idempotent: Lightning may call it several times (``lr_find``, every ``fit``).

        Returns:
            The optimizer, or Lightning's ``{"optimizer": ..., "lr_scheduler": {...}}`` dict when
            ``self.lr_scheduler`` is set.
        """
        build = self._declared("optimizer")
        if build is None:
            raise ValueError(
                f"`{type(self).__name__}` declares no optimizer for `NoDecayMixin` to build. Set one in"
                " `__init__`, e.g. `self.optimizer = functools.partial(torch.optim.AdamW, lr=1e-3,"
                " weight_decay=0.05)`, or take `optimizer: OptimizerCallable` as an `__init__` argument"
                " and assign it (LightningCLI then fills it from `--model.optimizer`)."
            )
        groups = _materialize(self.configure_param_groups())
        self._check_groups(groups)
        given = [dict(g) for g in groups]  # the optimizer fills its defaults into the dicts it is given
        optimizer = build(groups)
        self._check_optimizer(optimizer, given)
        _resolve(optimizer, given)
        exclude_own_decay(optimizer)
        attach_declared_hook(self, optimizer, self.weight_decay_decisions())
        schedule = self._declared("lr_scheduler")
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule(optimizer), **self.lr_scheduler_config}}

    def configure_callbacks(self) -> Any:
        """Bring the fit-lifecycle callback (see the class docstring) along with the Trainer's callbacks."""
        callbacks = _parent(self).configure_callbacks() if hasattr(_parent(self), "configure_callbacks") else []
        return [*_as_list(callbacks), FitLifecycle()]

    configure_callbacks._nodecay_keeps_lifecycle = True  # type: ignore[attr-defined]

    def _lifecycle(self) -> FitLifecycle | None:
        """The fit-lifecycle callback of the Trainer this module is attached to, if any."""
        trainer = getattr(self, "_trainer", None)
        callbacks = getattr(trainer, "callbacks", None) or []
        return next((c for c in callbacks if isinstance(c, FitLifecycle)), None)

    def _declared(self, name: str) -> Any:
        """The attribute ``name``; a class-level ``functools.partial`` as declared, not bound as a method.

        Python 3.13 warns (and 3.14 will bind) when a ``partial`` class attribute is read through an instance.
        """
        static = inspect.getattr_static(self, name, None)
        return static if isinstance(static, functools.partial) else getattr(self, name)

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Every trainable parameter in exactly one group, nothing else in any group."""
        module = _as_module(self)
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        names = {pid: name for pid, name in param_names(module).items() if pid in trainable}
        where: dict[int, str] = {}
        for i, group in enumerate(groups):
            label = f"`{group_name(group, i)}`"
            for param in group[PARAMS]:
                if id(param) not in names:
                    raise ValueError(
                        f"`{type(self).__name__}.configure_param_groups()` puts a parameter in group {label}"
                        " that is frozen or not part of the model; groups must hold exactly the trainable"
                        " parameters of the module."
                    )
                if id(param) in where:
                    raise ValueError(
                        f"`{type(self).__name__}.configure_param_groups()` puts parameter"
                        f" `{names[id(param)]}` in groups {where[id(param)]} and {label}; each parameter"
                        " must be in exactly one group."
                    )
                where[id(param)] = label
        missing = [name for pid, name in names.items() if pid not in where]
        if missing:
            raise ValueError(
                f"`{type(self).__name__}.configure_param_groups()` leaves out trainable parameter(s)"
                f" {listed(missing, quoted=True)}; they would never be trained. Put every"
                " trainable parameter in a group, or freeze it with `requires_grad_(False)`."
            )
        if not groups:
            raise ValueError(
                f"`{type(self).__name__}` has no trainable parameters, so there is nothing to optimize: every"
                " parameter has `requires_grad=False`. Unfreeze at least one module before `fit`, or let a"
                " fine-tuning callback freeze in `freeze_before_training` only what it unfreezes later."
            )

    def _check_optimizer(self, optimizer: object, groups: list[dict[str, Any]]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`{type(self).__name__}.optimizer` must return a `torch.optim.Optimizer` when called with"
                f" param groups; it returned {type(optimizer).__name__}. Set it to an optimizer class or a"
                " `functools.partial` of one, e.g. `functools.partial(torch.optim.AdamW, lr=1e-3)`."
            )
        label = type(optimizer).__name__
        if not accepts_weight_decay(optimizer):
            raise ValueError(
                f"`{label}` has no `weight_decay` option, so there is nothing for `NoDecayMixin` to"
                " split. Use an optimizer with weight decay (e.g. `torch.optim.AdamW`), or drop the mixin."
            )
        built = [[id(p) for p in g[PARAMS]] for g in optimizer.param_groups]
        given = [[id(p) for p in g[PARAMS]] for g in groups]
        if built != given or any(
            WEIGHT_DECAY in g and b[WEIGHT_DECAY] != g[WEIGHT_DECAY]
            for b, g in zip(optimizer.param_groups, groups, strict=False)
        ):
            raise ValueError(
                f"`{label}` did not keep the {len(groups)} param groups it was given"
                f" ({', '.join(str(g.get(NAME)) for g in groups)}); it has {len(optimizer.param_groups)}."
                " `self.optimizer` must pass its first argument on as `params` to an optimizer that"
                " accepts param groups, as every `torch.optim` optimizer does."
            )


def _resolve(optimizer: Optimizer, groups: list[dict[str, Any]]) -> None:
    """Give multiplier groups their ``weight_decay`` and ``lr``: multiplier x the optimizer's base."""
    for key, multiplier_key, resolve in (
        (WEIGHT_DECAY, WEIGHT_DECAY_MULTIPLIER, resolve_multipliers),
        (LR, LR_MULTIPLIER, resolve_lr),
    ):
        base = base_option(optimizer, groups, key, multiplier_key)
        if base is not None:
            resolve(optimizer.param_groups, base)
        elif any(g.get(multiplier_key, 1.0) not in (0, 1) and key not in g for g in groups):
            raise ValueError(
                f"`{type(optimizer).__name__}` shows no base `{key}` (not in its defaults, not filled into the"
                f" groups), so multiplier groups cannot be given multiplier x base. Pass `{key}=` to the optimizer."
            )


def _parent(module: NoDecayMixin) -> Any:
    """``super()`` of the mixin in ``module``'s MRO: the LightningModule's methods."""
    return super(NoDecayMixin, module)


def _as_list(callbacks: Any) -> list[Any]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _keeping_lifecycle(configure: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a subclass's ``configure_callbacks`` so the fit-lifecycle callback is always among its results."""

    @functools.wraps(configure)
    def configure_callbacks(self: Any) -> list[Any]:
        callbacks = _as_list(configure(self))
        if not any(isinstance(c, FitLifecycle) for c in callbacks):
            callbacks.append(FitLifecycle())
        return callbacks

    configure_callbacks._nodecay_keeps_lifecycle = True  # type: ignore[attr-defined]
    return configure_callbacks


def _materialize(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups with ``params`` as lists (a generator would be used up by the checks) and no empty group.

    Empty groups never reach the optimizer: DeepSpeed ZeRO-1/2 crash on them and ZeRO-3 drops them,
    misaligning LR schedulers.
    """
    listed = [{**g, PARAMS: [g[PARAMS]] if isinstance(g[PARAMS], Tensor) else list(g[PARAMS])} for g in groups]
    return [g for g in listed if g[PARAMS]]
