"""``NoDecayMixin``: a LightningModule mixin that builds decay / no-decay param groups.

The mixin is a plain class: it imports no Lightning namespace, so it works with a
``pytorch_lightning.LightningModule`` and a ``lightning.pytorch.LightningModule`` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union, cast

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_nodecay._log import listed, log
from lightning_nodecay.groups import (
    DecayDecision,
    MultiplierKey,
    decide,
    groups_from_decisions,
    resolve_multipliers,
)
from lightning_nodecay.layout import (
    LayoutPolicy,
    group_label,
    layout_of,
    param_names,
    resume_layouts,
    save_layouts,
)
from lightning_nodecay.masks import DecayStyle, apply_weight_decay_masks, attached_masks, needs_weight_decay_hook
from lightning_nodecay.rules import DEFAULT_NO_DECAY_MODULE_TYPES, DEFAULT_NO_DECAY_PARAM_NAMES, ModuleRule
from lightning_nodecay.safety_net import misplaced_exclusions, split_excluded
from lightning_nodecay.summary import DecaySummary, summarize

#: What LightningCLI injects for an ``optimizer: OptimizerCallable`` argument.
OptimizerCallable = Callable[[Iterable], Optimizer]
#: What LightningCLI injects for an ``lr_scheduler: LRSchedulerCallable`` argument.
LRSchedulerCallable = Callable[[Optimizer], Union[LRScheduler, ReduceLROnPlateau]]  # noqa: UP007 (runtime alias)


class NoDecayMixin:
    """Give a LightningModule decay / no-decay param groups, with no hand-written groups.

    Inherit it *before* the LightningModule base. Declare the optimizer as a callable that takes
    param groups (``functools.partial(torch.optim.AdamW, lr=..., weight_decay=...)``, or
    LightningCLI's ``OptimizerCallable``) in ``self.optimizer``; the mixin's
    :meth:`configure_optimizers` passes it the groups of :meth:`configure_param_groups`. The
    optimizer's own ``weight_decay`` applies to the ``decay`` group; ``no_decay`` gets ``0.0``.

    At fit start (in ``on_fit_start``: call ``super().on_fit_start()`` if you override it) a safety
    net moves excluded parameters out of any decayed group, whoever built the optimizer, and a
    summary of the groups is logged on rank zero.

    Checkpoints record the param-group layout of every optimizer (group names and parameter names).
    On resume the layout is compared with the optimizer's, after the safety net; if it changed, the
    saved optimizer state is moved to the current groups by parameter name and every move is
    logged (``on_layout_change = "remap"``, the default), or the resume is refused with a list of the
    differences (``on_layout_change = "error"``). Remap is the default because it gives each
    parameter exactly the state it would have had, which is what a changed exclusion or an upgrade
    needs; choose ``"error"`` to make any change of the groups a deliberate decision.

    Attributes:
        no_decay_module_types: module classes or predicates whose own parameters get no decay.
        no_decay_param_names: name patterns of parameters that get no decay.
        weight_decay_multipliers: ``{pattern or module type: multiplier}`` of the base decay.
        weight_decay_l1: patterns or module types whose decayed parameters get an L1 penalty
            instead of L2 (see :mod:`lightning_nodecay.masks`).
        weight_decay_style: ``"coupled"`` or ``"decoupled"``: how ``self.optimizer`` applies weight
            decay; needed for masks and L1 with optimizers outside ``torch.optim``.
        no_decay_strict: raise when a declared name pattern matches no parameter.
        log_weight_decay_summary: log the group summary at fit start.
        optimizer: callable ``(param_groups) -> Optimizer``.
        lr_scheduler: optional callable ``(optimizer) -> LRScheduler``.
        lr_scheduler_config: Lightning's scheduler options, e.g. ``{"interval": "step"}`` or
            ``{"monitor": "val_loss"}``.
        on_layout_change: what to do when resuming with param groups that differ from the
            checkpoint's: ``"remap"`` the optimizer state by parameter name, or raise (``"error"``).

    Example:
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

    no_decay_module_types: Sequence[ModuleRule] = DEFAULT_NO_DECAY_MODULE_TYPES
    no_decay_param_names: Sequence[str] = DEFAULT_NO_DECAY_PARAM_NAMES
    weight_decay_multipliers: Mapping[MultiplierKey, float] | None = None
    weight_decay_l1: Sequence[MultiplierKey] = ()
    weight_decay_style: DecayStyle | None = None
    no_decay_strict: bool = True
    log_weight_decay_summary: bool = True
    optimizer: OptimizerCallable | None = None
    lr_scheduler: LRSchedulerCallable | None = None
    lr_scheduler_config: Mapping[str, Any] = {}
    on_layout_change: LayoutPolicy = "remap"

    trainer: Any  # provided by the LightningModule

    def weight_decay_decisions(self) -> list[DecayDecision]:
        """The multiplier and reason of every trainable parameter, from the declarations."""
        return decide(
            self._module,
            no_decay_module_types=self.no_decay_module_types,
            no_decay_param_names=self.no_decay_param_names,
            weight_decay_multipliers=self.weight_decay_multipliers,
            weight_decay_l1=self.weight_decay_l1,
            strict=self.no_decay_strict,
        )

    def weight_decay_masks(self) -> dict[str, Tensor]:
        """Per-element weight-decay multipliers, ``{parameter name: tensor}``. Override to declare masks.

        Names are those of :meth:`weight_decay_decisions`. A mask scales the decay of its
        parameter element by element (same shape, or broadcastable such as one value per output
        row); see :func:`~lightning_nodecay.masks.apply_weight_decay_masks`. Called when the
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
        if self.optimizer is None:
            raise ValueError(
                f"`{type(self).__name__}` declares no optimizer for `NoDecayMixin` to build. Set one in"
                " `__init__`, e.g. `self.optimizer = functools.partial(torch.optim.AdamW, lr=1e-3,"
                " weight_decay=0.05)`, or take `optimizer: OptimizerCallable` as an `__init__` argument"
                " and assign it (LightningCLI then fills it from `--model.optimizer`)."
            )
        groups = _materialize(self.configure_param_groups())
        self._check_groups(groups)
        optimizer = self.optimizer(groups)
        self._check_optimizer(optimizer, groups)
        resolve_multipliers(optimizer.param_groups, optimizer.defaults["weight_decay"])
        self._hook_weight_decay(optimizer)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **self.lr_scheduler_config}}

    def on_fit_start(self) -> None:
        """Apply the safety net, check a resumed layout and log the summary, before any step or state restore."""
        trainer = self.trainer
        optimizers = trainer.optimizers
        for optimizer in optimizers:
            layout_of(optimizer.param_groups, self._module)  # refuses parameters given twice
        decisions = self.weight_decay_decisions()
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in optimizers:
            for message in split_excluded(optimizer, decisions, schedulers):  # every rank splits, rank 0 says so
                if trainer.global_rank == 0:
                    log.info(f"NoDecayMixin safety net: {message}.")
        if not any(attached_masks(optimizer) for optimizer in optimizers):  # built elsewhere
            for optimizer in optimizers:
                self._hook_weight_decay(optimizer)
        checkpoint = self.__dict__.pop("_nodecay_checkpoint", None)
        if checkpoint is not None:
            self._resume_layouts(checkpoint)
        self._nodecay_group_counts = [len(o.param_groups) for o in optimizers]
        if self.log_weight_decay_summary and trainer.global_rank == 0:
            masks = {p: m for o in optimizers if (h := attached_masks(o)) for p, m in h.masks.items()}
            log.info(f"Weight decay groups of `{type(self).__name__}`:\n{summarize(decisions, masks)}")
        self._parent_hook("on_fit_start")

    def on_train_epoch_start(self) -> None:
        """Refuse excluded parameters that a callback put in a decayed group since fit start."""
        counts = [len(o.param_groups) for o in self.trainer.optimizers]
        if counts != getattr(self, "_nodecay_group_counts", None):
            self._nodecay_group_counts = counts
            decisions = self.weight_decay_decisions()
            for optimizer in self.trainer.optimizers:
                misplaced = misplaced_exclusions(optimizer.param_groups, decisions)
                if misplaced:
                    raise ValueError(
                        f"Parameters excluded from weight decay ({listed(misplaced, quoted=True)}) were added to a"
                        f" decayed param group of `{type(optimizer).__name__}` after fit start, most likely by"
                        " Lightning's `BaseFinetuning.unfreeze_and_add_param_group` (e.g. `BackboneFinetuning`),"
                        " which gives new groups the optimizer's weight decay. Use"
                        " `lightning_nodecay.NoDecayBackboneFinetuning`, subclass"
                        " `lightning_nodecay.NoDecayFinetuning`, or call"
                        " `lightning_nodecay.unfreeze_and_add_param_groups` in your `finetune_function`."
                    )
        self._parent_hook("on_train_epoch_start")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the param-group layout of every optimizer in the checkpoint."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.optimizers:
            save_layouts(checkpoint, trainer.optimizers, self._module)
        self._parent_hook("on_save_checkpoint", checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's layout once the optimizers exist (now, or in :meth:`on_fit_start`)."""
        self._parent_hook("on_load_checkpoint", checkpoint)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return
        if trainer.strategy.restore_checkpoint_after_setup:  # the optimizers exist already
            self._resume_layouts(checkpoint)
        else:  # Lightning restores the optimizer state from this same dict after `on_fit_start`
            self._nodecay_checkpoint = checkpoint

    def _hook_weight_decay(self, optimizer: Optimizer) -> None:
        """Apply the declared masks and L1 groups to ``optimizer`` (nothing when none are declared)."""
        decisions, masks = self.weight_decay_decisions(), self.weight_decay_masks()
        if needs_weight_decay_hook(optimizer, masks, decisions):
            apply_weight_decay_masks(
                optimizer, masks, module=self._module, decay_style=self.weight_decay_style, decisions=decisions
            )

    def _resume_layouts(self, checkpoint: dict[str, Any]) -> None:
        trainer = self.trainer
        messages = resume_layouts(
            checkpoint,
            trainer.optimizers,
            self._module,
            [config.scheduler for config in trainer.lr_scheduler_configs],
            on_layout_change=self.on_layout_change,
            restorable=trainer.strategy.lightning_restore_optimizer,
        )
        if trainer.global_rank == 0:
            for message in messages:
                log.warning(f"NoDecayMixin resume: {message}")

    def _parent_hook(self, hook: str, *args: Any) -> None:
        """Call ``hook`` of the class after the mixin in the MRO (the LightningModule's), if it has one."""
        parent = getattr(super(), hook, None)
        if parent is not None:
            parent(*args)

    @property
    def _module(self) -> nn.Module:
        if not isinstance(self, nn.Module):
            raise TypeError(
                f"`NoDecayMixin` must be mixed into an `nn.Module` such as a LightningModule:"
                f" `class {type(self).__name__}(NoDecayMixin, pl.LightningModule)`."
            )
        return cast(nn.Module, self)

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Every trainable parameter in exactly one group, nothing else in any group."""
        trainable = {id(p) for p in self._module.parameters() if p.requires_grad}
        names = {pid: name for pid, name in param_names(self._module).items() if pid in trainable}
        where: dict[int, str] = {}
        for i, group in enumerate(groups):
            label = f"`{group_label(group, i)}`"
            for param in group["params"]:
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
        if "weight_decay" not in optimizer.defaults:
            raise ValueError(
                f"`{label}` has no `weight_decay` option, so there is nothing for `NoDecayMixin` to"
                " split. Use an optimizer with weight decay (e.g. `torch.optim.AdamW`), or drop the mixin."
            )
        built = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
        given = [[id(p) for p in g["params"]] for g in groups]
        if built != given or any(
            "weight_decay" in g and b["weight_decay"] != g["weight_decay"]
            for b, g in zip(optimizer.param_groups, groups, strict=False)
        ):
            raise ValueError(
                f"`{label}` did not keep the {len(groups)} param groups it was given"
                f" ({', '.join(str(g.get('name')) for g in groups)}); it has {len(optimizer.param_groups)}."
                " `self.optimizer` must pass its first argument on as `params` to an optimizer that"
                " accepts param groups, as every `torch.optim` optimizer does."
            )


def _materialize(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups with ``params`` as lists (a generator would be used up by the checks) and no empty group.

    Empty groups never reach the optimizer: DeepSpeed ZeRO-1/2 crash on them and ZeRO-3 drops them,
    misaligning LR schedulers.
    """
    listed = [{**g, "params": [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])} for g in groups]
    return [g for g in listed if g["params"]]
