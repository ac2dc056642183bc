"""Decay toward a reference (L2-SP, ``weight_decay_toward``): the step against oracles written out by hand, the
references (copies, dtype, device, checkpoints, bit-identical resume), the mixin, fine-tuning, the monitor, CLI and
bad input."""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, run_cli, trainer_kwargs
from models import RandomDataset, TanhNet
from oracles import OPTIMIZERS, assert_close, train
from pytorch_lightning.callbacks import BackboneFinetuning
from pytorch_lightning.loggers import CSVLogger
from test_silent_cases import LionLike
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import (
    GroupRules,
    NoDecayBackboneFinetuning,
    NoDecayMixin,
    WeightDecayHook,
    WeightNormMonitor,
    attach_weight_decay_hook,
    decide,
    param_groups,
)

WD = 0.3
STYLES = {"SGD-momentum": "coupled", "Adam": "coupled", "AdamW": "decoupled", "RMSprop": "coupled"}


class TowardByHand:
    """Reference optimizers: the penalty toward ``p0`` written out per parameter with plain tensor ops, then the
    optimizer's own update with its ``weight_decay`` at 0. Coupled: ``grad += wd * m * (p - p0)`` (L2) or
    ``wd * m * sign(p - p0)`` (L1); decoupled: ``p -= v * m * (p - p0)`` (L2) or the proximal step
    ``p = p0 + sign(p - p0) * max(|p - p0| - v * m, 0)`` (L1), with ``v = lr * wd`` (``lr / lr0 * wd`` when
    independent). Each group's ``wd`` is its ``toward_wd``."""

    def __init__(self, params: Any, by_hand: dict, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        self.by_hand = {"lr0": kwargs["lr"], "masks": {}, "l1": set(), **by_hand}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        assert closure is None
        spec = self.by_hand
        for group in self.param_groups:  # type: ignore[attr-defined]
            wd = group["toward_wd"]
            for p in group["params"]:
                if p.grad is None or not wd:
                    continue
                offset, mask, l1 = p - spec["references"][p], spec["masks"].get(p, 1.0), p in spec["l1"]
                if spec["style"] == "coupled":
                    p.grad.add_(wd * mask * (offset.sign() if l1 else offset))
                    continue
                value = group["lr"] * wd / (spec["lr0"] if spec["style"] == "independent" else 1.0)
                if l1:
                    p.copy_(spec["references"][p] + offset.sign() * (offset.abs() - value * mask).clamp(min=0))
                else:
                    p.sub_(value * mask * offset)
        return super().step()  # type: ignore[misc]


def oracle_optimizer(optimizer_class: type, params: Any, by_hand: dict, **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_class`` with :class:`TowardByHand`'s penalty, its own ``weight_decay`` at 0."""
    cls = type(f"{optimizer_class.__name__}TowardByHand", (TowardByHand, optimizer_class), {})
    return cls(params, by_hand, weight_decay=0.0, **kwargs)


def lion(params: Any, **kwargs: Any) -> LionLike:
    return LionLike(params, lr=0.01, **kwargs)


#: name: (factory taking params and weight_decay, optimizer class, style)
ALL_STYLES = {
    **{name: (OPTIMIZERS[name], OPTIMIZERS[name].func, style) for name, style in STYLES.items()},
    "Lion": (lion, LionLike, "independent"),
}


@pytest.mark.parametrize("penalty", ["l2", "l1"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(ALL_STYLES))
def test_step_toward_initial_matches_oracle(name, masked, penalty):
    """Test that 12 steps toward the initial weights equal the penalty written out by hand, for coupled (SGD, Adam,
    RMSprop), decoupled (AdamW) and independent (Lion-like) optimizers under an LR schedule, L2 and L1 (on `v`),
    with and without a mask (on `w`), and that the references never move."""
    build, optimizer_class, style = ALL_STYLES[name]
    net, reference = TanhNet(), TanhNet()
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    mask = torch.tensor([[1.0], [0.0], [2.0], [0.5]], dtype=torch.float64)
    l1 = ("v",) if penalty == "l1" else ()
    rules = GroupRules(no_decay_param_names=(), weight_decay_toward="initial", weight_decay_l1=l1)
    optimizer = build(param_groups(net, rules), weight_decay=WD)
    hook = attach_weight_decay_hook(optimizer, {"w": mask} if masked else None, module=net, decisions=decide(net, rules))
    assert len(hook.hooked_groups) == len(optimizer.param_groups)
    params = dict(reference.named_parameters())
    spec = {
        "references": {p: initial[n] for n, p in params.items()},
        "style": style,
        "masks": {params["w"]: mask} if masked else {},
        "l1": {params["v"]} if l1 else set(),
    }
    kwargs = {"lr": 0.01} if name == "Lion" else dict(OPTIMIZERS[name].keywords)
    oracle = oracle_optimizer(optimizer_class, [{"params": list(params.values()), "toward_wd": WD}], spec, **kwargs)

    def run(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        train(model, opt, steps=12, scheduler=torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5))

    run(net, optimizer)
    run(reference, oracle)
    assert_close(net.w, reference.w)
    assert_close(net.v, reference.v)
    for n, p in net.named_parameters():
        assert torch.equal(hook.references[p], initial[n])
    assert not torch.allclose(net.w, initial["w"])
