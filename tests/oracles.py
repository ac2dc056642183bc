"""Reference computations and comparisons shared by the tests: the pure-PyTorch training loop the oracle tests
drive, their optimizers, and exact comparisons of optimizer state, groups and weights."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

#: The optimizers of the pure-PyTorch oracle tests (weight decay given by each test).
OPTIMIZERS = {
    "SGD-momentum": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "Adam": functools.partial(torch.optim.Adam, lr=0.01),
    "AdamW": functools.partial(torch.optim.AdamW, lr=0.01),
    "RMSprop": functools.partial(torch.optim.RMSprop, lr=0.01),
}


def train(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 20,
    scheduler: Any = None,
    closure: bool = False,
) -> list[float]:
    """``steps`` steps of a ``(6 -> 3)`` float64 ``net`` on fixed random batches; returns the losses."""
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)

        def compute_loss(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            return loss.detach()

        losses.append(float(optimizer.step(compute_loss) if closure else (compute_loss(), optimizer.step())[0]))
        if scheduler is not None:
            scheduler.step()
    return losses


def random_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3, seed: int = 1) -> None:
    """A few optimizer steps with random gradients, so every state tensor is distinct."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def assert_close(actual: Any, expected: Any) -> None:
    """Equal up to float64 rounding of the same computation done another way."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def assert_all_close(actual: nn.Module, expected: nn.Module) -> None:
    """:func:`assert_close` for every parameter of two models of the same architecture."""
    for a, e in zip(actual.parameters(), expected.parameters(), strict=True):
        assert_close(a, e)


def group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[Any, list[str]]:
    """``{group name: [parameter names]}`` of ``optimizer``, names from ``model.named_parameters()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {g.get("name"): [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}


def state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """A copy of the optimizer's per-parameter state, keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        for p, state in optimizer.state.items()
    }


def assert_same_state(got: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    """Assert that two :func:`state_by_name` results hold the same parameters, keys and values, exactly."""
    assert got.keys() == expected.keys()
    for name, state in expected.items():
        assert got[name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got[name][key]), torch.as_tensor(value)), (name, key)


def assert_same_training(
    trainer: pl.Trainer, model: nn.Module, expected_trainer: pl.Trainer, expected: nn.Module
) -> None:
    """Assert that ``model`` ends with exactly the optimizer state and weights of ``expected``."""
    assert_same_state(
        state_by_name(trainer.optimizers[0], model), state_by_name(expected_trainer.optimizers[0], expected)
    )
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), name


class ShrinkByHand:
    """Base of reference optimizers that apply weight decay by hand: before each step, every parameter with a
    gradient is shrunk by ``1 - lr * shrink * mask`` (the group's ``lr`` and ``shrink``, 0 when absent; the
    parameter's mask from ``masks``, 1 when absent), then the optimizer's own update runs with its own
    ``weight_decay`` left at 0. Gradients must be final when ``step()`` is called (no closure)."""

    def __init__(self, params: Any, masks: dict[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        self.masks_by_hand = {id(p): m for p, m in (masks or {}).items()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        assert closure is None, "the reference decays before the update: call backward first, then step()"
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group.get("shrink", 0.0) * self.masks_by_hand.get(id(p), 1.0))
        return super().step()  # type: ignore[misc]


class AdamWByHand(ShrinkByHand, torch.optim.AdamW):
    """AdamW whose (masked) decoupled decay ``p *= 1 - lr * wd * mask`` is written out by hand: give each group its
    ``wd`` as ``shrink`` and ``weight_decay=0.0``."""


# -- MAE's layer-wise lr decay (util/lr_decay.py of facebookresearch/mae, after BEiT), transcribed ---------------


def mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit``: tokens and patch embedding 0, ``blocks.i`` ``i + 1``, the rest ``num_layers``."""
    if name in ["cls_token", "pos_embed"] or name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def mae_param_groups_lrd(
    model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list: Any = (), layer_decay: float = 0.75
) -> list[dict[str, Any]]:
    """MAE's ``param_groups_lrd``: groups ``layer_{id}_{decay|no_decay}`` with ``lr_scale`` and ``weight_decay``;
    no decay for every 1-D parameter and the names in ``no_weight_decay_list``. Its training loop then sets each
    group's ``lr`` to the scheduled lr x ``lr_scale`` (``util/lr_sched.py``)."""
    param_groups: dict[str, dict[str, Any]] = {}
    num_layers = len(model.blocks) + 1  # type: ignore[arg-type]
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = mae_layer_id(n, num_layers)
        group_name = f"layer_{layer_id}_{g_decay}"
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay, "params": []}
        param_groups[group_name]["params"].append(p)
    return list(param_groups.values())


def mae_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """The ``lr_scale`` MAE's :func:`mae_param_groups_lrd` gives each parameter, by name."""
    scales = {}
    for group in mae_param_groups_lrd(model, layer_decay=layer_decay):
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    return {n: scales[id(p)] for n, p in model.named_parameters()}


# -- DINO's weight-decay schedule (utils.py of facebookresearch/dino), transcribed ---------------------------


def dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino `utils.cosine_scheduler`, transcribed."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule
