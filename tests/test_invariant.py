"""Tests of ``lightning_nodecay._invariant`` on plain optimizers; in real fits, see ``test_silent_cases.py``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import norm_mlp
from oracles import random_steps

from lightning_nodecay import GroupRules, attach_weight_decay_hook, decide, param_groups
from lightning_nodecay._invariant import DecayInvariant, current_base, effective_decay

WD = 0.1
#: `2.weight` decayed at twice the base: groups `decay` (0.weight), `no_decay` (biases, LayerNorm), `decay_x2`.
RULES = GroupRules(weight_decay_multipliers={"2.weight": 2.0})


def guarded(masked: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer, DecayInvariant]:
    """``norm_mlp`` under SGD on the groups of ``RULES``, its invariant checked before every step; with ``masked``,
    a mask on ``2.weight`` (so ``decay_x2`` is decayed by the step hook)."""
    net = norm_mlp()
    optimizer = torch.optim.SGD(param_groups(net, RULES, weight_decay=WD), lr=0.1, weight_decay=WD)
    if masked:
        attach_weight_decay_hook(optimizer, {"2.weight": torch.tensor([[1.0], [0.0]])}, module=net)
    invariant = DecayInvariant(lambda: decide(net, RULES))
    invariant.check(optimizer)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: invariant.check(opt))
    return net, optimizer, invariant


def decay_key(group: dict[str, Any]) -> str:
    return "hook_weight_decay" if "hook_weight_decay" in group else "weight_decay"


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "hooked"])
def test_invariant_proportional_scaling_accepted_step_after_step(masked):
    """Test that scaling every decayed group by the same factor (a weight-decay schedule; hooked groups through
    `hook_weight_decay`) is accepted at every step, and `current_base` follows it."""
    net, optimizer, _ = guarded(masked)
    for step in range(1, 6):
        for group in optimizer.param_groups:
            group[decay_key(group)] *= 0.5
        random_steps(optimizer, list(net.parameters()), steps=1, seed=step)
        assert current_base(optimizer) == pytest.approx(WD * 0.5**step)
    found = [(g["name"], effective_decay(g)) for g in optimizer.param_groups]
    assert found == [("decay", pytest.approx(WD / 32)), ("no_decay", 0.0), ("decay_x2", pytest.approx(2 * WD / 32))]


def test_invariant_non_proportional_scaling_names_both_groups():
    """Test that changing one multiplier group alone is caught, naming both groups and their values."""
    _, optimizer, invariant = guarded()
    optimizer.param_groups[2]["weight_decay"] = 0.3
    with pytest.raises(
        ValueError,
        match=r"no longer share one base weight decay: `decay` 0.1 \(x1\), `decay_x2` 0.3 \(x2\); .*"
        r"`decay` gives base 0.1, `decay_x2` 0.15",
    ):
        invariant.check(optimizer)


def test_invariant_decayed_no_decay_group_caught():
    """Test that a `no_decay` group given weight decay is caught, before the step changes any weight."""
    net, optimizer, _ = guarded()
    optimizer.param_groups[1]["weight_decay"] = 0.1
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"`no_decay` of `SGD` \(`0.bias`, .*has decay 0.1 \(expected exactly 0\)"):
        random_steps(optimizer, list(net.parameters()), steps=1)
    for param, old in zip(net.parameters(), before, strict=True):
        assert torch.equal(param, old)


def test_invariant_excluded_parameter_moved_into_decayed_group_caught():
    """Test that an excluded parameter appended to a decayed group's `params` list is caught (the list's length
    changed, so membership is checked again)."""
    _, optimizer, invariant = guarded()
    decay, no_decay = optimizer.param_groups[:2]
    decay["params"].append(no_decay["params"].pop(0))
    with pytest.raises(ValueError, match=r"`decay` of `SGD` holds parameters excluded from weight decay \(`0.bias`\)"):
        invariant.check(optimizer)


def test_invariant_parameters_swapped_through_new_lists_caught():
    """Test that parameters swapped between two groups through new `params` lists, keeping both lengths, are
    caught (the lists' identity is part of the membership fingerprint)."""
    _, optimizer, invariant = guarded()
    decay, no_decay = optimizer.param_groups[:2]
    decay["params"], no_decay["params"] = [no_decay["params"][0]], [decay["params"][0], *no_decay["params"][1:]]
    with pytest.raises(ValueError, match=r"`decay` of `SGD` \(`0.bias`\) holds parameters excluded"):
        invariant.check(optimizer)


def test_invariant_parameters_swapped_in_place_keeping_lengths_go_unseen():
    """Test (documenting a limitation) that parameters swapped in place between the same two `params` lists,
    keeping their lengths, go unseen by an invariant that already checked the optimizer; a fresh one sees them."""
    net, optimizer, invariant = guarded()
    decay, no_decay = optimizer.param_groups[:2]
    decay["params"][0], no_decay["params"][0] = no_decay["params"][0], decay["params"][0]
    # LIMITATION: the fingerprint is (group, params list, length) per group, O(groups) per step; an in-place swap
    # keeps all three, so the per-parameter check does not run again and `0.bias` would be decayed silently.
    invariant.check(optimizer)
    with pytest.raises(ValueError, match=r"`decay` of `SGD` \(`0.bias`\) holds parameters excluded"):
        DecayInvariant(lambda: decide(net, RULES)).check(optimizer)


def test_invariant_hook_weight_decay_without_a_hook_caught():
    """Test that a group carrying `hook_weight_decay` with no hook attached (a masked run's groups restored into an
    optimizer without the hook) is caught: nothing would apply that decay."""
    net = norm_mlp()
    optimizer = torch.optim.SGD(param_groups(net), lr=0.1, weight_decay=WD)
    optimizer.param_groups[0].update(weight_decay=0.0, hook_weight_decay=WD)
    with pytest.raises(
        ValueError, match=r"`decay` of `SGD` carries `hook_weight_decay`.* but no weight-decay step hook applies it"
    ):
        DecayInvariant(lambda: decide(net)).check(optimizer)


def test_invariant_hooked_group_given_weight_decay_caught():
    """Test that a hooked group whose `weight_decay` becomes non-zero (it would be decayed twice) is caught."""
    _, optimizer, invariant = guarded(masked=True)
    assert (optimizer.param_groups[2]["weight_decay"], optimizer.param_groups[2]["hook_weight_decay"]) == (0.0, 0.2)
    optimizer.param_groups[2]["weight_decay"] = 0.2
    with pytest.raises(ValueError, match=r"`decay_x2` of `SGD` \(`2.weight`\) is decayed by the step hook .* twice"):
        invariant.check(optimizer)


def test_invariant_optimizer_without_weight_decay_passes():
    """Test that an optimizer with no weight decay at all (one group of every parameter) passes: its base is 0."""
    net = norm_mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    invariant = DecayInvariant(lambda: decide(net))
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: invariant.check(opt))
    random_steps(optimizer, list(net.parameters()))
    assert current_base(optimizer) == 0.0


class NoDefaultDecay(torch.optim.Optimizer):
    """An optimizer whose `defaults` have no `weight_decay`."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})


def test_invariant_current_base_and_effective_decay():
    """Test `effective_decay` (`weight_decay` + `hook_weight_decay`) and `current_base` (from a group the library
    built, else the optimizer's default, else `None`) on examples."""
    assert effective_decay({"weight_decay": 0.0, "hook_weight_decay": 0.05}) == 0.05
    assert effective_decay({"weight_decay": 0.1}) == 0.1
    assert effective_decay({"params": []}) == 0.0
    w = torch.zeros(2, requires_grad=True)
    assert (
        current_base(torch.optim.AdamW([{"params": [w], "weight_decay": 0.3, "weight_decay_multiplier": 2.0}])) == 0.15
    )
    built = torch.optim.AdamW(param_groups(norm_mlp()), weight_decay=0.05)
    built.param_groups[0]["weight_decay"] = 0.02  # a schedule moved the base since
    assert current_base(built) == 0.02
    assert current_base(torch.optim.AdamW([w], weight_decay=0.05)) == 0.05
    assert current_base(NoDefaultDecay([w])) is None
