"""Tests of ``lightning_nodecay._safety_net`` on plain optimizers; its fixes in real fits are in ``test_mixin.py``."""

import pytest
import torch
from torch import nn

from lightning_nodecay import GroupRules, decide
from lightning_nodecay._safety_net import split_by_decisions


def test_split_names_unnamed_groups_like_lr_monitor():
    """Test that split unnamed groups are named `pg1`, `pg2`, ... by position, as LearningRateMonitor names them."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = [{"params": net[0].parameters()}, {"params": net[1].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=0.1)
    split_by_decisions(optimizer, decide(net))
    assert [g["name"] for g in optimizer.param_groups] == ["pg1", "pg2", "pg1_no_decay", "pg2_no_decay"]
    a, b = net
    assert [g["params"] for g in optimizer.param_groups] == [[a.weight], [b.weight], [a.bias], [b.bias]]


def test_split_applies_declared_multipliers_and_l1():
    """Test that an optimizer built elsewhere gets the declared multipliers and L1 groups, at multiplier x its decay."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Embedding(3, 2))
    rules = GroupRules(weight_decay_multipliers={"1.weight": 2.0}, weight_decay_l1=(nn.Embedding,))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.05)
    messages = split_by_decisions(optimizer, decide(net, rules))
    found = [(g["name"], g["weight_decay"], g.get("weight_decay_penalty")) for g in optimizer.param_groups]
    assert found == [
        ("decay", 0.05, None),
        ("no_decay", 0.0, None),
        ("decay_x2", pytest.approx(0.1), None),
        ("decay_l1", 0.05, "l1"),
    ]
    assert optimizer.param_groups[2]["params"] == [net[1].weight]
    assert optimizer.param_groups[3]["params"] == [net[2].weight]
    assert len(messages) == 3
    assert "moved 1 tensor (1.weight) to new group `decay_x2` with weight_decay=0.1" in messages[1]


def test_split_whole_group_converted_in_place():
    """Test that a group holding only parameters of another kind is converted in place, not emptied."""
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    groups = [{"params": [net[0].weight], "name": "w"}, {"params": list(net[1].parameters()), "name": "norm"}]
    optimizer = torch.optim.SGD(groups, lr=0.1, weight_decay=0.1)
    messages = split_by_decisions(optimizer, decide(net, GroupRules(strict=False, no_decay_param_names=())))
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("w", 0.1), ("norm", 0.0)]
    assert messages == [
        "SGD group `norm`: moved 2 excluded tensors (1.weight, 1.bias): the whole group, set its weight_decay=0.0"
    ]


def test_split_zeroes_asgd_own_decay_in_excluded_groups():
    """Test that ASGD's own shrink (`lambd`) is 0 in the groups excluded from weight decay, and kept elsewhere."""
    net = nn.Linear(2, 2)
    optimizer = torch.optim.ASGD(net.parameters(), lr=0.1, lambd=1e-3, weight_decay=0.1)
    split_by_decisions(optimizer, decide(net))
    assert [(g["name"], g["lambd"]) for g in optimizer.param_groups] == [("decay", 1e-3), ("no_decay", 0.0)]


class CachesPerGroup(torch.optim.SGD):
    """Keeps one lr per group from construction, like torch_optimizer.AdaBound's `zip(param_groups, base_lrs)`."""

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.base_lrs = [group["lr"] for group in self.param_groups]


def test_split_refuses_optimizer_with_per_group_caches():
    """Test that an optimizer keeping per-group lists from construction is refused before a group is added."""
    net = nn.Linear(2, 2)
    optimizer = CachesPerGroup(net.parameters(), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"`CachesPerGroup` keeps one entry per param group .*\(`base_lrs`\)"):
        split_by_decisions(optimizer, decide(net))
    assert [len(g["params"]) for g in optimizer.param_groups] == [2]  # untouched


def test_split_leaves_groups_without_decay_alone():
    """Test that a group with no weight decay is not split: nothing in it is decayed."""
    net = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert split_by_decisions(optimizer, decide(net)) == []
    assert len(optimizer.param_groups) == 1


def test_group_of_only_scaled_parameters_at_the_default_decay_is_scaled():
    """Test that a hand-built group at the optimizer's own `weight_decay` whose only decayed parameter has a declared
    multiplier (x2) gets 2x that decay, not the default renamed `decay_x2` (the base is the optimizer's value)."""
    model = nn.Sequential(nn.Linear(4, 2))
    rules = GroupRules(weight_decay_multipliers={"0.weight": 2.0})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01)
    split_by_decisions(optimizer, decide(model, rules))
    decays = {g["name"]: (g["weight_decay"], [id(p) for p in g["params"]]) for g in optimizer.param_groups}
    assert decays["decay_x2"] == (pytest.approx(0.02), [id(model[0].weight)])
    assert decays["no_decay"] == (0.0, [id(model[0].bias)])
