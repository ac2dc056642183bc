"""Fine-tuning callbacks that keep the weight-decay split when they unfreeze modules.

Lightning's ``BaseFinetuning.unfreeze_and_add_param_group`` puts every unfrozen parameter in *one*
new group with the optimizer's default weight decay, so unfrozen biases and norm scales are
decayed. It also skips any parameter whose *value* equals one already in the optimizer
(``torch.equal``), so a zero-initialised bias or a fresh ``LayerNorm`` of the backbone is never
trained when the head holds one of the same shape and value. Here unfrozen parameters are split by
the same decisions as the rest of the model (``decay`` / ``no_decay`` / multiplier groups, each with
an explicit ``weight_decay``) and deduplicated by identity. New L1 groups and groups decayed toward a
reference are taken over by the step hook, their references being the weights as they are unfrozen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Union

from torch import nn
from torch.optim import Optimizer

from lightning_nodecay._invariant import current_base
from lightning_nodecay._lightning import BackboneFinetuning, BaseFinetuning
from lightning_nodecay._log import log
from lightning_nodecay._naming import clean_name, group_name
from lightning_nodecay._schema import LR, LR_FAMILY, LR_MULTIPLIER, NAME, PARAMS, WEIGHT_DECAY, WEIGHT_DECAY_MULTIPLIER
from lightning_nodecay._semantics import accepts_weight_decay, exclude_own_decay, needs_hook
from lightning_nodecay.groups import DecayDecision, decide, groups_from_decisions
from lightning_nodecay.hook import WeightDecayHook, attach_weight_decay_hook
from lightning_nodecay.mixin import NoDecayMixin
from lightning_nodecay.rules import GroupRules

Modules = Union[nn.Module, Iterable[Any]]  # noqa: UP007 (a runtime alias)


def unfreeze_and_add_param_groups(
    pl_module: nn.Module,
    modules: Modules,
    optimizer: Optimizer,
    lr: float | None = None,
    initial_denom_lr: float = 10.0,
    train_bn: bool = True,
    name: str | None = None,
    rules: GroupRules | None = None,
) -> list[dict[str, Any]]:
    """Unfreeze ``modules`` and add their parameters to ``optimizer``, split into weight-decay groups.

    A drop-in for Lightning's ``BaseFinetuning.unfreeze_and_add_param_group`` (same ``lr``,
    ``initial_denom_lr`` and ``train_bn`` semantics) to call from a ``finetune_function``. Each
    parameter is judged by the rules of ``pl_module`` (its ``NoDecayMixin`` declarations, or the
    defaults), with its full name. Parameters already in the optimizer are recognised by identity
    and left where they are.

    Args:
        pl_module: the LightningModule (the names and rules of its parameters).
        modules: the module(s) to unfreeze.
        optimizer: the optimizer that receives the new groups.
        lr: learning rate of the new groups; default: the first group's ``lr / initial_denom_lr``.
        initial_denom_lr: divisor of the first group's ``lr`` when ``lr`` is not given.
        train_bn: also train BatchNorm layers.
        name: prefix of the new group names, ``{name}_decay``, ``{name}_no_decay``, ...; default:
            the path of a single module in ``pl_module`` (``backbone``), otherwise ``unfrozen``.
        rules: the rules to judge the parameters by; default: ``pl_module``'s own when it is a
            ``NoDecayMixin``, else ``GroupRules(strict=False)``.

    Returns:
        The groups added (none when every parameter was already in the optimizer).

    Raises:
        TypeError: ``modules`` is not a module or an iterable of modules.
        ValueError: ``optimizer`` has no ``weight_decay`` option, a parameter is not part of
            ``pl_module``, or an explicit ``name`` is already used by a group.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_nodecay import param_groups
        >>> model = nn.Module()
        >>> model.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).requires_grad_(False)
        >>> model.head = nn.Linear(4, 2)
        >>> optimizer = torch.optim.AdamW(param_groups(model), lr=1e-3, weight_decay=0.05)
        >>> added = unfreeze_and_add_param_groups(model, model.backbone, optimizer, lr=1e-4)
        >>> [(g["name"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups]  # doctest: +NORMALIZE_WHITESPACE
        [('decay', 0.05, 0.001), ('no_decay', 0.0, 0.001),
         ('backbone_decay', 0.05, 0.0001), ('backbone_no_decay', 0.0, 0.0001)]
    """
    _check_modules(modules)
    base = current_base(optimizer)
    if base is None or not accepts_weight_decay(optimizer):
        raise ValueError(
            f"`{type(optimizer).__name__}` has no `weight_decay` option, so unfrozen parameters cannot be split into"
            " decay and no-decay groups. Use an optimizer with weight decay (e.g. `torch.optim.AdamW`), or Lightning's"
            " `BaseFinetuning.unfreeze_and_add_param_group`."
        )
    BaseFinetuning.make_trainable(modules)
    params = list(BaseFinetuning.filter_params(modules, train_bn=train_bn, requires_grad=True))
    new = _new_decisions(params, optimizer, _decisions(pl_module, rules))
    groups = groups_from_decisions(new)
    kinds = [g[NAME] for g in groups]
    prefix = _new_group_prefix(name, pl_module, modules, optimizer, kinds)
    first = optimizer.param_groups[0]
    base_lr = first[LR] / first.get(LR_MULTIPLIER, 1.0) / initial_denom_lr if lr is None else float(lr)
    for group, kind in zip(groups, kinds, strict=True):
        group[NAME], group[LR] = f"{prefix}_{kind}", base_lr * group.get(LR_MULTIPLIER, 1.0)
        group[WEIGHT_DECAY] = group[WEIGHT_DECAY_MULTIPLIER] * base
        if LR_MULTIPLIER in group:  # their own base learning rate: a family of their own
            group[LR_FAMILY] = prefix
        optimizer.add_param_group(group)
    exclude_own_decay(optimizer)
    _hook_new_groups(pl_module, optimizer, new)
    if groups:
        shown = ", ".join(f"`{g[NAME]}` ({len(g[PARAMS])}, weight_decay={g[WEIGHT_DECAY]:g})" for g in groups)
        log.info(f"Unfroze {len(new)} parameter tensors into new groups {shown}.")
    return groups


def _check_modules(modules: object) -> None:
    if isinstance(modules, nn.Module):
        return
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Iterable):
        raise TypeError(
            f"`modules` must be an `nn.Module` or an iterable of modules, e.g. `pl_module.backbone`; got {modules!r}."
        )
    for module in modules:
        _check_modules(module)


def _hook_new_groups(pl_module: nn.Module, optimizer: Optimizer, new: list[DecayDecision]) -> None:
    """Give the new L1 and reference groups the step hook; their references are their weights now, as unfrozen."""
    hook = WeightDecayHook.of(optimizer)
    if hook is not None:
        hook.add_groups(new, pl_module)
    elif needs_hook(optimizer, {}, new):
        style = pl_module.decay_style if isinstance(pl_module, NoDecayMixin) else None
        attach_weight_decay_hook(optimizer, module=pl_module, decay_style=style, decisions=new)


def _decisions(pl_module: nn.Module, rules: GroupRules | None) -> list[DecayDecision]:
    if rules is not None:
        return decide(pl_module, rules)
    if isinstance(pl_module, NoDecayMixin):
        return pl_module.weight_decay_decisions()
    return decide(pl_module, GroupRules(strict=False))


def _new_decisions(
    params: Iterable[nn.Parameter], optimizer: Optimizer, decisions: Iterable[DecayDecision]
) -> list[DecayDecision]:
    """Decisions of the ``params`` that are not in ``optimizer`` yet, by identity, each once."""
    present = _in_optimizer(optimizer)
    by_id = {id(d.param): d for d in decisions}
    new: dict[int, DecayDecision] = {}
    for param in params:
        if id(param) in present or id(param) in new:
            continue
        if id(param) not in by_id:
            raise ValueError(
                f"A parameter of shape {tuple(param.shape)} in `modules` is not a parameter of `pl_module`; unfreeze"
                " submodules of the LightningModule being trained."
            )
        new[id(param)] = by_id[id(param)]
    return list(new.values())


def _in_optimizer(optimizer: Optimizer) -> set[int]:
    """``id()`` of every parameter of ``optimizer``."""
    return {id(p) for g in optimizer.param_groups for p in g[PARAMS]}


def _new_group_prefix(
    name: str | None, pl_module: nn.Module, modules: Modules, optimizer: Optimizer, kinds: list[str]
) -> str:
    """The prefix of the new groups' names: ``name``, else the module's path, numbered to keep names unique."""
    taken = {group_name(g, i) for i, g in enumerate(optimizer.param_groups)}
    if name is not None:
        clash = [f"{name}_{k}" for k in kinds if f"{name}_{k}" in taken]
        if clash:
            raise ValueError(
                f"The optimizer already has a group named `{clash[0]}`; pass another `name` to"
                " `unfreeze_and_add_param_groups` so every group keeps a unique name."
            )
        return name
    base = _module_path(pl_module, modules) or "unfrozen"
    candidate, n = base, 1
    while any(f"{candidate}_{k}" in taken for k in kinds):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _module_path(pl_module: nn.Module, modules: Modules) -> str:
    if not isinstance(modules, nn.Module):
        return ""
    return next((clean_name(n) for n, m in pl_module.named_modules() if m is modules), "")


class NoDecayFinetuning(BaseFinetuning):
    """Lightning's ``BaseFinetuning`` whose unfreezing keeps the weight-decay split.

    Subclass it exactly like ``BaseFinetuning`` (override ``freeze_before_training`` and
    ``finetune_function``); ``self.unfreeze_and_add_param_group(modules, optimizer, ...)`` then
    adds the unfrozen parameters as ``decay`` / ``no_decay`` / multiplier groups (see
    :func:`unfreeze_and_add_param_groups`), and deduplication is by identity, not value.

    On resume, Lightning restores the groups added before the checkpoint but leaves their
    parameters frozen (``freeze_before_training`` froze them again in ``setup``); this callback
    unfreezes them, so training after the resume updates them as before.

    Examples:
        >>> class UnfreezeEncoder(NoDecayFinetuning):
        ...     def freeze_before_training(self, pl_module):
        ...         self.freeze(pl_module.encoder)
        ...     def finetune_function(self, pl_module, epoch, optimizer):
        ...         if epoch == 2:
        ...             self.unfreeze_and_add_param_group(pl_module.encoder, optimizer, lr=1e-4)
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remember the LightningModule (its names and rules), then freeze as ``BaseFinetuning`` does."""
        self._pl_module = pl_module
        super().setup(trainer, pl_module, stage)

    def unfreeze_and_add_param_group(  # type: ignore[override]  # Lightning's is static: ours needs the module
        self,
        modules: Modules,
        optimizer: Optimizer,
        lr: float | None = None,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
    ) -> None:
        """Unfreeze ``modules`` into weight-decay groups; see :func:`unfreeze_and_add_param_groups`."""
        unfreeze_and_add_param_groups(
            self._pl_module, modules, optimizer, lr=lr, initial_denom_lr=initial_denom_lr, train_bn=train_bn
        )

    @staticmethod
    def filter_on_optimizer(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """The ``params`` not in ``optimizer``, by identity (Lightning compares values)."""
        present = _in_optimizer(optimizer)
        return [p for p in params if id(p) not in present]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Restore the groups of a resumed run, and make their parameters trainable again."""
        restarting = self._restarting and bool(self._internal_optimizer_metadata)
        super().on_fit_start(trainer, pl_module)
        if restarting:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    for param in group[PARAMS]:
                        param.requires_grad_(True)


class NoDecayBackboneFinetuning(NoDecayFinetuning, BackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` whose unfrozen backbone keeps the weight-decay split.

    Same arguments and schedule as ``BackboneFinetuning``; the backbone is added as groups
    ``backbone_decay`` / ``backbone_no_decay`` (and multiplier groups), all following the backbone
    learning rate.

    Examples:
        >>> from lightning_nodecay import NoDecayBackboneFinetuning
        >>> callback = NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=5, train_bn=True)
    """

    def freeze_before_training(self, pl_module: Any) -> None:
        """Freeze ``pl_module.backbone``, refusing a LightningModule without one."""
        if not isinstance(getattr(pl_module, "backbone", None), nn.Module):
            raise ValueError(
                f"`{type(self).__name__}` freezes and later unfreezes `pl_module.backbone`, but"
                f" `{type(pl_module).__name__}` has no `backbone` module. Assign the part to fine-tune to"
                " `self.backbone`, or subclass `NoDecayFinetuning` to choose the modules."
            )
        super().freeze_before_training(pl_module)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze or schedule the backbone as ``BackboneFinetuning``, on every backbone group."""
        super().finetune_function(pl_module, epoch, optimizer)
        if epoch <= self.unfreeze_backbone_at_epoch:  # the groups were just added at their own lrs
            return
        # Lightning sets its backbone lr on the last group only: every backbone group gets it x its multiplier
        for group in optimizer.param_groups:
            if str(group.get(NAME, "")).startswith("backbone_"):
                group[LR] = self.previous_backbone_lr * group.get(LR_MULTIPLIER, 1.0)
