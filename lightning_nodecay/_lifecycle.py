"""The fit lifecycle of :class:`~lightning_nodecay.NoDecayMixin`, as a callback the mixin brings along.

The mixin returns one :class:`FitLifecycle` from ``configure_callbacks()`` (Lightning merges it with the
Trainer's callbacks), so a user's own ``on_fit_start``, ``on_train_epoch_start``, ``on_save_checkpoint`` or
``on_load_checkpoint`` without ``super()`` cannot switch anything off. It owns every piece of state of a fit:

- the decisions, computed once per fit and again only when the set of trainable parameters changes;
- at fit start: the safety net (excluded parameters out of decayed groups, whoever built the optimizer),
  the step hook for masks and L1 on optimizers built elsewhere, the resume check of a checkpoint's layout,
  and the summary, logged on rank zero;
- before every optimizer step: the weight-decay invariant (``_invariant.py``), in O(number of groups), per
  parameter when group membership changed (a callback, unfreezing, a resume);
- checkpoints: the layout of every optimizer, recorded at save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_nodecay._checkpoint import resume_layouts, save_layouts
from lightning_nodecay._invariant import DecayInvariant
from lightning_nodecay._layout import layout_of
from lightning_nodecay._lightning import Callback
from lightning_nodecay._log import log
from lightning_nodecay._safety_net import split_by_decisions
from lightning_nodecay._schema import PARAMS
from lightning_nodecay._semantics import needs_hook
from lightning_nodecay.groups import DecayDecision, decide
from lightning_nodecay.hook import WeightDecayHook, after_closure, attach_weight_decay_hook
from lightning_nodecay.summary import summarize

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from lightning_nodecay.mixin import NoDecayMixin


class FitLifecycle(Callback):
    """Safety net, step hook, resume check, summary and the invariant before every step of a ``NoDecayMixin`` fit."""

    def __init__(self) -> None:
        self._decisions: tuple[tuple[int, ...], list[DecayDecision]] | None = None
        self._pending_checkpoint: dict[str, Any] | None = None
        self._guards: list[RemovableHandle] = []
        self._hook_steps: dict[int, int] = {}

    def decisions(self, module: NoDecayMixin) -> list[DecayDecision]:
        """The decisions of ``module``'s rules, recomputed only when its trainable parameters changed."""
        trainable = tuple(id(p) for p in _as_module(module).parameters() if p.requires_grad)
        if self._decisions is None or self._decisions[0] != trainable:
            self._decisions = trainable, decide(_as_module(module), module.configure_group_rules())
        return self._decisions[1]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start every fit afresh: nothing is carried over from a previous one."""
        self._decisions, self._pending_checkpoint, self._hook_steps = None, None, {}
        self._remove_guards()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the invariant's step hooks from the optimizers."""
        self._remove_guards()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Safety net, step hook, resume check and summary, before any step and before state is restored."""
        module = _mixin(pl_module)
        optimizers = trainer.optimizers
        for optimizer in optimizers:
            layout_of(optimizer.param_groups, pl_module)  # refuses parameters given twice
        decisions = self.decisions(module)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in optimizers:
            for message in split_by_decisions(optimizer, decisions, schedulers):  # every rank splits, rank 0 says so
                if trainer.global_rank == 0:
                    log.info(f"NoDecayMixin safety net: {message}.")
        if not any(WeightDecayHook.of(optimizer) for optimizer in optimizers):  # built elsewhere
            for optimizer in optimizers:
                attach_declared_hook(module, optimizer, decisions)
        checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        if checkpoint is not None:
            self._resume(trainer, module, checkpoint)
        if module.check_weight_decay:
            for optimizer in optimizers:
                self._guard(module, optimizer)
        if module.log_weight_decay_summary and trainer.global_rank == 0:
            for optimizer in optimizers:
                log.info(_summary(pl_module, optimizer, decisions, several=len(optimizers) > 1))

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note how many steps every weight-decay hook has run so far, to verify each step against."""
        self._hook_steps = {id(h): h.steps for o in trainer.optimizers if (h := WeightDecayHook.of(o)) is not None}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Verify that the weight-decay hook ran for this step: torch calls step hooks before Lightning gets here.

        Under a ``GradScaler`` Lightning runs the closure before ``optimizer.step``, so there is nothing to verify.
        """
        hook = WeightDecayHook.of(optimizer)
        if hook is None or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        if hook.steps == self._hook_steps.get(id(hook), 0):
            raise RuntimeError(
                f"The weight-decay hook of `{type(optimizer).__name__}` did not run for this optimizer step, so its"
                " masked and L1 groups (whose decay the hook applies in place of the optimizer) would not be decayed."
                " torch did not call the optimizer's step pre-hooks: torch 2.1 and 2.2 stop calling them once"
                " `torch.compile` has run in the process, and an optimizer wrapper may bypass them. Upgrade torch,"
                " and call `optimizer.step()` on the optimizer itself."
            )
        self._hook_steps[id(hook)] = hook.steps

    def _guard(self, module: NoDecayMixin, optimizer: Optimizer) -> None:
        """Check the invariant now, and before every step of ``optimizer`` (fresh decisions when membership changed)."""
        invariant = DecayInvariant(lambda: self.decisions(module), culprit=_CULPRIT)
        invariant.check(optimizer)
        hook = WeightDecayHook.of(optimizer)
        if hook is not None:  # right before the hook's decay, which must not happen on a refused step
            self._guards.append(hook.add_check(invariant.check))
        else:  # after the closure (and `on_before_optimizer_step` inside it), before the update
            self._guards.append(
                optimizer.register_step_pre_hook(
                    lambda opt, args, kwargs: after_closure(args, kwargs, lambda: invariant.check(opt))
                )
            )

    def _remove_guards(self) -> None:
        for handle in self._guards:
            handle.remove()
        self._guards = []

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


def _summary(pl_module: nn.Module, optimizer: Optimizer, decisions: list[DecayDecision], several: bool) -> str:
    """The summary of ``optimizer``'s real groups, in the light of the decisions of the parameters it holds."""
    held = {id(p) for group in optimizer.param_groups for p in group[PARAMS]}
    hook = WeightDecayHook.of(optimizer)
    summary = summarize(
        [d for d in decisions if id(d.param) in held], hook.masks if hook else None, groups=optimizer.param_groups
    )
    which = f" ({type(optimizer).__name__})" if several else ""
    return f"Weight decay groups of `{type(pl_module).__name__}`{which}:\n{summary}"


_CULPRIT = (
    "after fit start, by a callback (e.g. Lightning's `BaseFinetuning`), a scheduler, a resumed checkpoint or a"
    " `configure_optimizers` that ignores the decisions"
)


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
