"""The fit lifecycle of :class:`~lightning_nodecay.NoDecayMixin`, as a callback the mixin brings along.

The mixin returns one :class:`FitLifecycle` from ``configure_callbacks()`` (Lightning merges it with the
Trainer's callbacks), so a user's own ``on_fit_start``, ``on_train_epoch_start``, ``on_save_checkpoint`` or
``on_load_checkpoint`` without ``super()`` cannot switch anything off. It owns every piece of state of a fit:

- the decisions, computed once per fit and again only when the set of trainable parameters changes;
- at fit start: the safety net (excluded parameters out of decayed groups, whoever built the optimizer),
  the step hook for masks and L1 on optimizers built elsewhere, the resume check of a checkpoint's layout,
  and the summary, logged on rank zero;
- every epoch: a check that no callback put excluded parameters into a decayed group;
- checkpoints: the layout of every optimizer, recorded at save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer

from lightning_nodecay._checkpoint import resume_layouts, save_layouts
from lightning_nodecay._layout import layout_of
from lightning_nodecay._lightning import Callback
from lightning_nodecay._log import log
from lightning_nodecay._naming import listed
from lightning_nodecay._safety_net import misplaced_exclusions, split_excluded
from lightning_nodecay._semantics import needs_hook
from lightning_nodecay.groups import DecayDecision, decide
from lightning_nodecay.hook import WeightDecayHook, attach_weight_decay_hook
from lightning_nodecay.summary import summarize

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_nodecay.mixin import NoDecayMixin


class FitLifecycle(Callback):
    """Safety net, step hook, resume check, summary and per-epoch checks of a ``NoDecayMixin`` fit."""

    def __init__(self) -> None:
        self._decisions: tuple[tuple[int, ...], list[DecayDecision]] | None = None
        self._pending_checkpoint: dict[str, Any] | None = None
        self._group_counts: list[int] | None = None

    def decisions(self, module: NoDecayMixin) -> list[DecayDecision]:
        """The decisions of ``module``'s rules, recomputed only when its trainable parameters changed."""
        trainable = tuple(id(p) for p in _as_module(module).parameters() if p.requires_grad)
        if self._decisions is None or self._decisions[0] != trainable:
            self._decisions = trainable, decide(_as_module(module), module.configure_group_rules())
        return self._decisions[1]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start every fit afresh: nothing is carried over from a previous one."""
        self._decisions, self._pending_checkpoint, self._group_counts = None, None, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Safety net, step hook, resume check and summary, before any step and before state is restored."""
        module = _mixin(pl_module)
        optimizers = trainer.optimizers
        for optimizer in optimizers:
            layout_of(optimizer.param_groups, pl_module)  # refuses parameters given twice
        decisions = self.decisions(module)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in optimizers:
            for message in split_excluded(optimizer, decisions, schedulers):  # every rank splits, rank 0 says so
                if trainer.global_rank == 0:
                    log.info(f"NoDecayMixin safety net: {message}.")
        if not any(WeightDecayHook.of(optimizer) for optimizer in optimizers):  # built elsewhere
            for optimizer in optimizers:
                attach_declared_hook(module, optimizer, decisions)
        checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        if checkpoint is not None:
            self._resume(trainer, module, checkpoint)
        self._group_counts = [len(o.param_groups) for o in optimizers]
        if module.log_weight_decay_summary and trainer.global_rank == 0:
            masks = {p: m for o in optimizers if (hook := WeightDecayHook.of(o)) for p, m in hook.masks.items()}
            log.info(f"Weight decay groups of `{type(pl_module).__name__}`:\n{summarize(decisions, masks)}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse excluded parameters that a callback put in a decayed group since fit start."""
        counts = [len(o.param_groups) for o in trainer.optimizers]
        if counts == self._group_counts:
            return
        self._group_counts = counts
        decisions = self.decisions(_mixin(pl_module))
        for optimizer in trainer.optimizers:
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

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Record the param-group layout of every optimizer in the checkpoint."""
        if trainer.optimizers:
            save_layouts(checkpoint, trainer.optimizers, pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Check the checkpoint's layout once the optimizers exist (now, or at fit start)."""
        if trainer.state.fn != "fit":
            return
        if trainer.strategy.restore_checkpoint_after_setup:  # the optimizers exist already
            self._resume(trainer, _mixin(pl_module), checkpoint)
        else:  # Lightning restores the optimizer state from this same dict after `on_fit_start`
            self._pending_checkpoint = checkpoint

    def _resume(self, trainer: pl.Trainer, module: NoDecayMixin, checkpoint: dict[str, Any]) -> None:
        messages = resume_layouts(
            checkpoint,
            trainer.optimizers,
            _as_module(module),
            [config.scheduler for config in trainer.lr_scheduler_configs],
            on_layout_change=module.on_layout_change,
            restorable=trainer.strategy.lightning_restore_optimizer,
        )
        if trainer.global_rank == 0:
            for message in messages:
                log.warning(f"NoDecayMixin resume: {message}")


def attach_declared_hook(module: NoDecayMixin, optimizer: Optimizer, decisions: list[DecayDecision]) -> None:
    """Attach the step hook for ``module``'s declared masks and L1 groups (nothing when none are declared)."""
    masks = module.weight_decay_masks()
    if needs_hook(optimizer, masks, decisions):
        attach_weight_decay_hook(
            optimizer, masks, module=_as_module(module), decay_style=module.decay_style, decisions=decisions
        )


def _mixin(pl_module: pl.LightningModule) -> NoDecayMixin:
    from lightning_nodecay.mixin import NoDecayMixin

    if not isinstance(pl_module, NoDecayMixin):
        raise TypeError(
            f"`FitLifecycle` works for a `NoDecayMixin` module; `{type(pl_module).__name__}` is not one. It is"
            " added by `NoDecayMixin.configure_callbacks()`: inherit the mixin instead of adding the callback."
        )
    return pl_module


def _as_module(module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"`NoDecayMixin` must be mixed into an `nn.Module` such as a LightningModule:"
            f" `class {type(module).__name__}(NoDecayMixin, pl.LightningModule)`."
        )
    return module
