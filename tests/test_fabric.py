"""The documented Lightning Fabric recipe: groups, masks and weight norms on Fabric's wrapped model and optimizer."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from oracles import AdamWByHand
from torch import nn

from lightning_nodecay import GroupRules, attach_weight_decay_hook, group_norms, param_groups

LR, WD, STEPS = 0.01, 0.1, 5


class Net(nn.Module):
    """``body`` (Linear + LayerNorm) -> tanh -> ``head``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 4, generator=generator) for _ in range(STEPS)]


def test_fabric_recipe_groups_masks_and_norms(tmp_path):
    """Test that with Fabric, root-anchored rules, masks keyed by name on the wrapped optimizer and per-group weight
    norms logged to CSV work, and training matches a hand-written AdamW with the masked decay."""
    pytest.importorskip("lightning")
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    model = Net()
    reference = copy.deepcopy(model)
    head_mask = torch.tensor([[1.0], [0.0]])  # decay row 0 of `head.weight`, not row 1

    # --- the recipe -------------------------------------------------------------------------------------------
    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(tmp_path))
    rules = GroupRules(weight_decay_multipliers={"head.*": 2.0})  # `head.bias` stays excluded: biases get none
    optimizer = torch.optim.AdamW(param_groups(model, rules, weight_decay=WD), lr=LR, weight_decay=WD)
    model, optimizer = fabric.setup(model, optimizer)
    attach_weight_decay_hook(optimizer, {"head.weight": head_mask}, module=model)

    for step, batch in enumerate(batches()):
        loss = model(batch).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        norms = group_norms([g["params"] for g in optimizer.param_groups]).norms
        names = [f"weight_2.0_norm/{g['name']}" for g in optimizer.param_groups]
        fabric.log_dict(dict(zip(names, norms, strict=True)), step=step)
    fabric.logger.finalize("success")
    # ----------------------------------------------------------------------------------------------------------

    inner = model.module
    assert next(n for n, _ in model.named_parameters()).startswith("_forward_module.")  # Fabric's names
    groups = optimizer.param_groups
    assert [(g["name"], g["weight_decay"], g.get("hook_weight_decay")) for g in groups] == [
        ("decay", WD, None),
        ("no_decay", 0.0, None),
        ("decay_x2", 0.0, pytest.approx(2 * WD)),  # masked: the hook applies its decay
    ]
    assert groups[2]["params"] == [inner.head.weight]
    wrapped = param_groups(model, rules, weight_decay=WD)  # the wrapped model gives the same groups
    assert [(g["name"], g["params"]) for g in wrapped] == [(g["name"], g["params"]) for g in groups]

    by_hand = AdamWByHand(
        [
            {"params": [reference.body[0].weight], "shrink": WD},
            {"params": [reference.body[0].bias, *reference.body[1].parameters(), reference.head.bias]},
            {"params": [reference.head.weight], "shrink": 2 * WD},
        ],
        masks={reference.head.weight: head_mask},
        lr=LR,
        weight_decay=0.0,
    )
    for batch in batches():
        reference(batch).pow(2).mean().backward()
        by_hand.step()
        by_hand.zero_grad()
    for (name, actual), expected in zip(inner.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == STEPS
    for group, reference_group in zip(groups, by_hand.param_groups, strict=True):
        expected = torch.cat([p.detach().flatten() for p in reference_group["params"]]).norm().item()
        assert float(rows[-1][f"weight_2.0_norm/{group['name']}"]) == pytest.approx(expected, rel=1e-5)
