"""Per-rule weight-decay multipliers (``weight_decay_multipliers``), against hand-built groups."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from helpers import FIT_OPTIMIZERS, OPTIMIZERS, TwoLayerModel, assert_close, run_cli, train, trainer_kwargs
from torch import nn

from lightning_nodecay import decide, group_name, param_groups, summarize

WD = 0.1


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def assert_all_close(actual: nn.Module, expected: nn.Module) -> None:
    for a, e in zip(actual.parameters(), expected.parameters(), strict=True):
        assert_close(a, e)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multipliers_rule_equals_group_with_scaled_weight_decay(name):
    """Test that a 2.0 rule for 20 steps equals a hand-built group with twice the weight decay."""
    ruled, by_hand = make_net(), make_net()
    groups = param_groups(ruled, weight_decay_multipliers={"2.weight": 2.0}, weight_decay=WD)
    assert [(g["name"], g.get("weight_decay")) for g in groups] == [
        ("decay", None),
        ("no_decay", 0.0),
        ("decay_x2", 2 * WD),
    ]
    train(ruled, OPTIMIZERS[name](groups, weight_decay=WD))
    hand_groups = [
        {"params": [by_hand[0].weight]},
        {"params": [by_hand[0].bias, by_hand[2].bias], "weight_decay": 0.0},
        {"params": [by_hand[2].weight], "weight_decay": 2 * WD},
    ]
    train(by_hand, OPTIMIZERS[name](hand_groups, weight_decay=WD))
    assert_all_close(ruled, by_hand)


class Ruled(TwoLayerModel):
    weight_decay_multipliers = {"head.weight": 2.0}  # noqa: RUF012


class ByHand(TwoLayerModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [self.body.weight]},
            {"params": [self.body.bias, self.head.bias], "weight_decay": 0.0},
            {"params": [self.head.weight], "weight_decay": 2 * 0.5},
        ]
        return self.optimizer(groups)


@pytest.mark.parametrize("optimizer", FIT_OPTIMIZERS.values(), ids=FIT_OPTIMIZERS)
def test_multipliers_mixin_rule_equals_hand_built_group_in_trainer_fit(tmp_path, optimizer):
    """Test that through a real Trainer fit a 2.0 rule equals a hand-built group with twice the decay."""
    kwargs = trainer_kwargs(tmp_path, max_steps=5, precision="64-true")
    ruled, by_hand = Ruled(optimizer), ByHand(optimizer)
    pl.Trainer(**kwargs).fit(ruled)
    pl.Trainer(**kwargs).fit(by_hand)
    groups = ruled.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.5), ("no_decay", 0.0), ("decay_x2", 1.0)]
    assert_all_close(ruled, by_hand)


def test_multipliers_follow_cli_weight_decay(tmp_path):
    """Test that `--model.optimizer.weight_decay` from LightningCLI scales the multiplier groups."""
    args = ["--model.optimizer=SGD", "--model.optimizer.lr=0.1", "--model.optimizer.weight_decay=0.3"]
    cli = run_cli(Ruled, tmp_path, *args, max_steps=1)
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.3), ("no_decay", 0.0), ("decay_x2", 0.6)]


@pytest.mark.parametrize(
    ("multipliers", "expected"),
    [
        ({"*": 2.0}, {"0.weight": 2.0, "0.bias": 0.0, "2.weight": 2.0, "2.bias": 0.0}),  # exclusions win
        ({"*": 3.0, "2.*": 0.5}, {"0.weight": 3.0, "0.bias": 0.0, "2.weight": 0.5, "2.bias": 0.0}),
        ({nn.Linear: 0.25, "0.weight": 4.0}, {"0.weight": 0.25, "0.bias": 0.0, "2.weight": 0.25, "2.bias": 0.0}),
        ({"0.weight": 0.0}, {"0.weight": 0.0, "0.bias": 0.0, "2.weight": 1.0, "2.bias": 0.0}),
    ],
)
def test_multipliers_smallest_proposal_wins(multipliers, expected):
    """Test the precedence rule: every matching rule proposes, exclusions propose 0, the smallest wins."""
    assert {d.name: d.multiplier for d in decide(make_net(), weight_decay_multipliers=multipliers)} == expected


def test_multipliers_tied_parameter_takes_smallest_over_paths():
    """Test that a parameter reached through two paths gets the smallest multiplier of both."""
    net = make_net()
    net.append(net[0])  # `3.weight` is `0.weight`
    decisions = decide(net, weight_decay_multipliers={"0.weight": 2.0, "3.weight": 0.5})
    (tied,) = [d for d in decisions if d.param is net[0].weight]
    assert (tied.name, tied.multiplier, tied.reason) == (
        "0.weight",
        0.5,
        "tied to `3.weight`: multiplier rule `3.weight`",
    )


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, True, "2", None])
def test_multipliers_refuse_bad_values(value):
    """Test that a negative, NaN, infinite or non-number multiplier is refused, naming its key."""
    with pytest.raises(ValueError, match=r"`weight_decay_multipliers\['head\.\*'\]` is .*finite float >= 0"):
        decide(make_net(), weight_decay_multipliers={"head.*": value})


def test_multipliers_refuse_non_mapping_and_unmatched_pattern():
    """Test that a non-dict is refused and, with `strict`, a multiplier pattern that matches nothing."""
    with pytest.raises(TypeError, match=r"`weight_decay_multipliers` must be a dict"):
        decide(make_net(), weight_decay_multipliers=[("2.weight", 2.0)])
    with pytest.raises(ValueError, match=r"`weight_decay_multipliers` pattern `2.weigth`.*Did you mean `2.weight`"):
        decide(make_net(), weight_decay_multipliers={"2.weigth": 2.0})
    assert all(d.multiplier in (0, 1) for d in decide(make_net(), weight_decay_multipliers={"x.*": 2.0}, strict=False))


def test_multipliers_group_names_stay_unique():
    """Test that multipliers equal to 6 significant digits still get distinct group names."""
    net = make_net()
    groups = param_groups(net, weight_decay_multipliers={"0.weight": 0.1234567, "2.weight": 0.1234568}, weight_decay=1)
    names = [g["name"] for g in groups]
    assert names == ["no_decay", "decay_x0.1234567", "decay_x0.1234568"]
    assert group_name(0.5) == "decay_x0.5"


def test_multipliers_shown_in_summary():
    """Test that the summary lists multiplier groups and the rule behind them."""
    text = str(summarize(decide(make_net(), weight_decay_multipliers={"2.weight": 2.0})))
    assert "2 | decay_x2 | x2    | 1       | 12" in text
    assert "multiplier rule `2.weight`: 1 tensor (2.weight)" in text
