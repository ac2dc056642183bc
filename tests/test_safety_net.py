"""Tests of ``lightning_nodecay._safety_net`` on plain optimizers; its fixes in real fits are in ``test_mixin.py``."""

import torch
from torch import nn

from lightning_nodecay import decide
from lightning_nodecay._safety_net import misplaced_exclusions, split_excluded


def test_split_excluded_names_unnamed_groups_like_lr_monitor():
    """Test that split unnamed groups are named `pg1`, `pg2`, ... by position, as LearningRateMonitor names them."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = [{"params": net[0].parameters()}, {"params": net[1].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=0.1)
    split_excluded(optimizer, decide(net))
    assert [g["name"] for g in optimizer.param_groups] == ["pg1", "pg2", "pg1_no_decay", "pg2_no_decay"]
    a, b = net
    assert [g["params"] for g in optimizer.param_groups] == [[a.weight], [b.weight], [a.bias], [b.bias]]


def test_misplaced_exclusions_names_excluded_parameters_in_decayed_groups():
    """Test the check behind the mixin's refusal of decayed exclusions added after fit start."""
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = [
        {"params": [net[0].weight], "weight_decay": 0.1},
        {"params": [net[0].bias, net[1].weight], "weight_decay": 0.1},
    ]
    assert misplaced_exclusions(groups, decide(net)) == ["0.bias", "1.weight"]
    groups[1]["weight_decay"] = 0.0
    assert misplaced_exclusions(groups, decide(net)) == []
