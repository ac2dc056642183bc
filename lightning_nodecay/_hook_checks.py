"""Validation of the weight-decay step hook's inputs: masks, their parameters' names and placement. Pure PyTorch.

Every check runs when the hook is attached, before training, and names the parameter.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_nodecay._naming import clean_name, param_names, unwrap
from lightning_nodecay._schema import PARAMS, PENALTY, TOWARD, WEIGHT_DECAY
from lightning_nodecay._semantics import group_penalty, group_toward, quoted_group_name
from lightning_nodecay.groups import DecayDecision

#: Masks keyed by parameter name (needs ``module``), by parameter, or both.
Masks = Union[Mapping[str, Tensor], Mapping[Tensor, Tensor], Mapping[Union[str, Tensor], Tensor]]  # noqa: UP007


def check_placement(optimizer: Optimizer, param: Tensor, index: int | None, names: HookNames) -> None:
    name, label = names.of(param), type(optimizer).__name__
    if index is None:
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is in no param group of `{label}`. Mask"
            " only parameters that this optimizer trains, or add the parameter to it."
        )
    excluded = names.excluded.get(id(param))
    if excluded is not None:
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is excluded from weight decay by"
            f" {excluded}, so the mask would have no effect. Remove the mask, or stop excluding the"
            " parameter (a mask scales the decay a parameter gets; it does not override exclusions)."
        )
    if not optimizer.param_groups[index].get(WEIGHT_DECAY):
        raise ValueError(
            f"Parameter `{name}` has a weight-decay mask but is in group {quoted_group_name(optimizer, index)}"
            f" of `{label}`, whose weight_decay is 0, so the mask would have no effect. Remove the"
            " mask, or put the parameter in a group with weight decay."
        )


def check_mask(name: str, param: Tensor, mask: object) -> Tensor:
    """Validate one mask and cast it to the parameter's device and dtype."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"The weight-decay mask of `{name}` must be a tensor; got {type(mask).__name__}.")
    try:
        shape = torch.broadcast_shapes(mask.shape, param.shape)
    except RuntimeError:
        shape = None
    if shape != param.shape:
        row = (param.shape[0],) + (1,) * (param.ndim - 1) if param.ndim else ()
        raise ValueError(
            f"The weight-decay mask of `{name}` has shape {tuple(mask.shape)}, which does not broadcast"
            f" to the parameter's shape {tuple(param.shape)}. Give one multiplier per element (shape"
            f" {tuple(param.shape)}) or a broadcastable shape such as {row} (one per output row)."
        )
    values = mask.detach() if mask.is_floating_point() else mask.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"The weight-decay mask of `{name}` contains NaN or inf; multipliers must be finite.")
    if bool((values < 0).any()):
        raise ValueError(
            f"The weight-decay mask of `{name}` has a negative multiplier ({values.min().item():g});"
            " multipliers must be >= 0 (0 = no decay, 1 = the group's decay)."
        )
    return mask.detach().to(device=param.device, dtype=param.dtype)


def check_reference(name: str, param: Tensor, reference: object) -> Tensor:
    """Validate one reference and copy it into the parameter's device, dtype and sharding (a DTensor's placements).

    Raises:
        TypeError: not a tensor.
        ValueError: another shape than the parameter, or NaN or inf values.
    """
    if not isinstance(reference, Tensor):
        raise TypeError(f"The weight-decay reference of `{name}` must be a tensor; got {type(reference).__name__}.")
    if reference.shape != param.shape:
        raise ValueError(
            f"The weight-decay reference of `{name}` has shape {tuple(reference.shape)}, the parameter"
            f" {tuple(param.shape)}: a reference is the parameter's own value in another model of this architecture."
        )
    reference = reference.detach()
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None and getattr(reference, "device_mesh", None) is None:  # a full tensor for a DTensor parameter
        from torch.distributed.tensor import distribute_tensor

        reference = distribute_tensor(reference.to(param.dtype), mesh, param.placements)  # type: ignore[attr-defined]
    finite = torch.isfinite(reference).all()
    if not bool(finite.full_tensor() if hasattr(finite, "full_tensor") else finite):
        raise ValueError(f"The weight-decay reference of `{name}` contains NaN or inf.")
    return reference.to(device=param.device, dtype=param.dtype, copy=True)


class HookNames:
    """Parameter names for keys and messages, from the module, the decisions or the optimizer."""

    def __init__(
        self, optimizer: Optimizer, module: nn.Module | None, decisions: Iterable[DecayDecision] | None
    ) -> None:
        self.module = module
        self.decisions = list(decisions or ())
        self.excluded = {id(d.param): d.reason for d in self.decisions if d.multiplier == 0}
        self.by_name: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        for i, group in enumerate(optimizer.param_groups):
            for j, param in enumerate(group[PARAMS]):
                self._names[id(param)] = f"param_groups[{i}]['params'][{j}]"
        self._names.update({id(d.param): d.name for d in self.decisions})
        if module is not None:
            for name, param in unwrap(module).named_parameters(remove_duplicate=False):
                self.by_name.setdefault(clean_name(name), param)
            self._names.update(param_names(module))

    def of(self, param: Tensor) -> str:
        return self._names.get(id(param), f"<parameter of shape {tuple(param.shape)}>")

    def resolve(self, masks: Masks | None, what: str = "mask") -> Iterator[tuple[Tensor, Tensor]]:
        """``(parameter, mask)`` pairs (or references, ``what="reference"``), each parameter once, names checked."""
        if masks is None:
            return
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"Weight-decay {what}s must be a dict `{{parameter name: tensor}}`; got {type(masks).__name__}."
            )
        seen: dict[int, str] = {}
        for key, mask in masks.items():
            param = self._param(key, what)
            if id(param) in seen:
                raise ValueError(
                    f"Parameter `{self.of(param)}` has two weight-decay {what}s (keys `{seen[id(param)]}` and"
                    f" `{key if isinstance(key, str) else self.of(param)}`); give one."
                )
            seen[id(param)] = key if isinstance(key, str) else self.of(param)
            yield param, mask

    def _param(self, key: object, what: str) -> Tensor:
        if isinstance(key, Tensor):
            if not key.requires_grad:
                raise ValueError(
                    f"Parameter `{self.of(key)}` has a weight-decay {what} but is frozen (requires_grad=False), so it"
                    f" is never decayed. Remove the {what}, or unfreeze the parameter."
                )
            return key
        if not isinstance(key, str):
            raise TypeError(f"Weight-decay {what}s are keyed by parameter name or parameter; got {key!r}.")
        if self.module is None:
            raise TypeError(
                f"The weight-decay {what} `{key}` is keyed by name: pass the model as"
                " `attach_weight_decay_hook(..., module=model)` so names can be resolved."
            )
        param = self.by_name.get(clean_name(key))
        if param is None:
            trainable = [n for n, p in self.by_name.items() if p.requires_grad]
            close = difflib.get_close_matches(key, trainable, n=3)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ValueError(
                f"Weight-decay {what} for unknown parameter `{key}`.{hint} Key {what}s by the parameter names that"
                " `lightning_nodecay.decide(module)` reports (`named_parameters()` without wrapper segments)."
            )
        if not param.requires_grad:
            raise ValueError(
                f"Parameter `{key}` has a weight-decay {what} but is frozen (requires_grad=False), so it is"
                f" never decayed. Remove the {what}, or unfreeze the parameter."
            )
        return param

    def check_no_excluded(self, optimizer: Optimizer, index: int) -> None:
        """Refuse a hooked group holding an excluded parameter: the hook would decay it."""
        group = optimizer.param_groups[index]
        excluded = [p for p in group[PARAMS] if id(p) in self.excluded]
        if excluded and group.get(WEIGHT_DECAY):
            name = self.of(excluded[0])
            raise ValueError(
                f"Parameter `{name}` is excluded from weight decay by {self.excluded[id(excluded[0])]} but is"
                f" in group {quoted_group_name(optimizer, index)} of `{type(optimizer).__name__}`, whose decay the"
                " mask / L1 hook applies to every parameter. Put it in a group with `weight_decay=0.0`"
                " (`param_groups(...)` and `NoDecayMixin.configure_param_groups()` do)."
            )

    def check_forms(self, optimizer: Optimizer, placed: Mapping[int, int]) -> None:
        """Refuse an L1 or toward-reference decision sitting in a group that is not an L1 or reference group."""
        for decision in self.decisions:
            index = placed.get(id(decision.param))
            if index is None or decision.multiplier == 0:
                continue
            if decision.penalty == "l1" and group_penalty(optimizer, index) != "l1":
                self._refuse_form(optimizer, decision, index, "an L1 penalty", f"'{PENALTY}': 'l1'")
            if decision.toward == "initial" and group_toward(optimizer, index) != "initial":
                self._refuse_form(optimizer, decision, index, "decay toward its reference", f"'{TOWARD}': 'initial'")

    @staticmethod
    def _refuse_form(optimizer: Optimizer, decision: DecayDecision, index: int, form: str, key: str) -> None:
        raise ValueError(
            f"Parameter `{decision.name}` should get {form} ({decision.reason}) but is in group"
            f" {quoted_group_name(optimizer, index)} of `{type(optimizer).__name__}`, which has no `{key}`. Build the"
            " groups with `param_groups(...)` or `NoDecayMixin.configure_param_groups()`, which put it in its group."
        )
