"""The input checks of the weight-decay step hook (``lightning_nodecay._hook_checks``): every bad mask or setup is
refused when the hook is attached, before training, naming the parameter."""

from __future__ import annotations

import math

import pytest
import torch
from models import TanhNet
from torch import nn

from lightning_nodecay import GroupRules, WeightDecayHook, attach_weight_decay_hook, decide, param_groups

WD = 0.1


class Frozen(TanhNet):
    """``TanhNet`` with a frozen parameter and a bias (excluded by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(3))


def build(**overrides):
    net = Frozen()
    groups = param_groups(net)
    kwargs = {"module": net, "decisions": decide(net)} | overrides
    return net, torch.optim.AdamW(groups, lr=0.01, weight_decay=WD), kwargs


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ({"w": torch.ones(6, 4)}, ValueError, r"mask of `w` has shape \(6, 4\).*shape \(4, 6\).*\(4, 1\)"),
        ({"w": torch.ones(1, 4, 6)}, ValueError, r"mask of `w` has shape \(1, 4, 6\), which does not broadcast"),
        ({"w": -torch.ones(4, 1)}, ValueError, r"mask of `w` has a negative multiplier \(-1\)"),
        ({"w": torch.tensor([[1.0], [math.nan], [1.0], [1.0]])}, ValueError, r"mask of `w` contains NaN or inf"),
        ({"v": torch.full((3, 4), math.inf)}, ValueError, r"mask of `v` contains NaN or inf"),
        ({"ww": torch.ones(4, 6)}, ValueError, r"unknown parameter `ww`\. Did you mean `w`\?"),
        ({"frozen": torch.ones(3)}, ValueError, r"`frozen` has a weight-decay mask but is frozen"),
        ({"bias": torch.ones(3)}, ValueError, r"`bias` has a weight-decay mask but is excluded.*name pattern `bias`"),
        ({"w": [1.0]}, TypeError, r"mask of `w` must be a tensor; got list"),
        ({"w": torch.ones(4, 6), "_orig_mod.w": torch.ones(4, 6)}, ValueError, r"`w` has two weight-decay masks"),
    ],
)
def test_masks_refuse_bad_masks_naming_the_parameter(masks, error, match):
    """Test that every bad mask is refused before training with the parameter's name."""
    _, optimizer, kwargs = build()
    with pytest.raises(error, match=match):
        attach_weight_decay_hook(optimizer, masks, **kwargs)
    assert WeightDecayHook.of(optimizer) is None


def test_masks_refuse_bad_setups():
    """Test the setup errors: decay-less group, foreign parameter, names without module, fused, twice, style."""
    net, optimizer, kwargs = build()
    with pytest.raises(
        ValueError, match=r"`bias` has a weight-decay mask but is in group `no_decay`.*weight_decay is 0"
    ):
        attach_weight_decay_hook(optimizer, {net.bias: torch.ones(3)}, module=net)
    with pytest.raises(ValueError, match=r"in no param group of `AdamW`"):
        attach_weight_decay_hook(optimizer, {nn.Parameter(torch.ones(2)): torch.ones(2)})
    with pytest.raises(TypeError, match=r"mask `w` is keyed by name: pass the model"):
        attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)})
    with pytest.raises(ValueError, match=r"`decay_style='coupled'` contradicts `AdamW`.*decoupled"):
        attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, **kwargs, decay_style="coupled")
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, **kwargs)
    with pytest.raises(ValueError, match=r"`AdamW` already has a weight-decay hook"):
        attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, **kwargs)
    fused = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=WD, fused=True)
    with pytest.raises(ValueError, match=r"uses `fused=True`"):
        attach_weight_decay_hook(fused, {"w": torch.ones(4, 6)}, module=net)
    mixed = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=WD)
    with pytest.raises(
        ValueError, match=r"`bias` is excluded from weight decay by name pattern `bias` but is in group `pg1`"
    ):
        attach_weight_decay_hook(mixed, {"w": torch.ones(4, 6)}, **kwargs)
    plain_l1 = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=WD)
    with pytest.raises(ValueError, match=r"`w` should get an L1 penalty \(L1 rule `w`\) but is in group `pg1`"):
        attach_weight_decay_hook(plain_l1, {}, module=net, decisions=decide(net, GroupRules(weight_decay_l1=("w",))))
