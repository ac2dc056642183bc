import io

import pytest
import torch
from helpers import assert_same_state, state_by_name
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_nodecay import (
    GroupLayout,
    Layout,
    LayoutMismatchError,
    compare_layouts,
    layout_of,
    param_groups,
    remap_optimizer_state,
    remap_scheduler_state,
)
from lightning_nodecay.layout import LAYOUT_KEY, resume_layouts, save_layouts, source_groups


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def train(optimizer, params, steps=3, seed=1):
    """A few steps with random gradients, so every state tensor is distinct."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_layout_of_names_groups_and_parameters():
    """Test that the layout lists group names and cleaned parameter names in optimizer order."""
    net = small_net()
    optimizer = torch.optim.AdamW(param_groups(net))
    assert layout_of(optimizer.param_groups, net) == Layout(
        (
            GroupLayout("decay", ("0.weight", "2.weight")),
            GroupLayout("no_decay", ("0.bias", "1.weight", "1.bias", "2.bias")),
        )
    )


def test_layout_of_unnamed_groups_wrappers_and_foreign_parameters():
    """Test `pgN` names for unnamed groups, wrapper segments removed, `?` for parameters outside the module."""
    net = small_net()
    wrapped = nn.Sequential(checkpoint_wrapper(net))
    stray = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [net[0].weight]}, {"params": [net[1].bias, stray]}], lr=0.1)
    assert layout_of(optimizer.param_groups, wrapped).to_state() == [
        {"name": "pg1", "params": ["0.0.weight"]},
        {"name": "pg2", "params": ["0.1.bias", "?pg2[1]"]},
    ]


def test_layout_of_refuses_a_parameter_given_twice():
    """Test that a parameter listed twice is named, with the fix."""
    net = small_net()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = torch.optim.AdamW([p for m in net.modules() for p in m.parameters()], weight_decay=0.1)
    with pytest.raises(ValueError, match=r"holds parameter `0.weight` twice.*not from `self.modules\(\)`"):
        layout_of(optimizer.param_groups, net)


def test_layout_state_survives_a_weights_only_load():
    """Test that a saved layout is plain data that `torch.load(weights_only=True)` accepts."""
    net = small_net()
    optimizer = torch.optim.AdamW(param_groups(net))
    checkpoint = {}
    save_layouts(checkpoint, [optimizer], net)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert Layout.from_state(loaded[LAYOUT_KEY][0]) == layout_of(optimizer.param_groups, net)


def test_compare_layouts_equal_is_falsy():
    """Test that identical layouts compare as no difference."""
    layout = Layout((GroupLayout("decay", ("a", "b")),))
    diff = compare_layouts(layout, Layout((GroupLayout("decay", ("a", "b")),)))
    assert not diff
    assert diff.lines() == []


def test_compare_layouts_lists_every_difference():
    """Test moved, added, dropped parameters and group changes, one line each."""
    saved = Layout((GroupLayout("decay", ("w1", "w2", "b1")), GroupLayout("no_decay", ("n1", "gone"))))
    current = Layout(
        (GroupLayout("decay", ("w1", "w2")), GroupLayout("no_decay", ("b1", "n1")), GroupLayout("decay_x2", ("new",)))
    )
    diff = compare_layouts(saved, current)
    assert diff.moved == (("b1", "decay", "no_decay"),)
    assert diff.added == (("new", "decay_x2"),)
    assert diff.dropped == (("gone", "no_decay"),)
    assert diff.lines() == [
        "groups `decay`, `no_decay` -> `decay`, `no_decay`, `decay_x2`",
        "`b1`: `decay` -> `no_decay`",
        "`new`: new in `decay_x2`, starts with fresh state",
        "`gone`: no longer in any group (was in `no_decay`), its state is dropped",
    ]


def test_compare_layouts_order_change_is_a_difference():
    """Test that the same members in another order count as a change (positional restore would swap them)."""
    diff = compare_layouts(Layout((GroupLayout("decay", ("a", "b")),)), Layout((GroupLayout("decay", ("b", "a")),)))
    assert diff
    assert diff.lines() == ["order of the parameters in `decay` changed"]


def test_source_groups_same_name_then_majority_then_none():
    """Test which saved group each current group continues."""
    saved = Layout((GroupLayout("decay", ("a", "b", "c")), GroupLayout("no_decay", ("d",))))
    current = Layout(
        (
            GroupLayout("no_decay", ("a",)),
            GroupLayout("decay_x2", ("b", "c", "d")),
            GroupLayout("fresh", ("e",)),
        )
    )
    assert source_groups(saved, current) == [1, 0, None]


def test_positional_restore_misplaces_state_control():
    """Test the bug this module exists for: PyTorch loads state by position when groups were reordered."""
    net = small_net()
    before = torch.optim.AdamW(param_groups(net), lr=0.1, weight_decay=0.1)
    train(before, list(net.parameters()))
    saved = before.state_dict()
    reordered = [{**g, "params": list(reversed(g["params"]))} for g in param_groups(net)]
    after = torch.optim.AdamW(reordered, lr=0.1, weight_decay=0.1)
    after.load_state_dict(saved)  # no error
    assert not torch.equal(after.state[net[0].weight]["exp_avg"], before.state[net[0].weight]["exp_avg"])


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_remap_optimizer_state_moves_state_by_name(optimizer_class):
    """Test that every parameter gets exactly its own saved state in a new grouping; new ones start fresh."""
    net = small_net()
    kwargs = {"lr": 0.1, "weight_decay": 0.1} | ({"momentum": 0.9} if optimizer_class is torch.optim.SGD else {})
    trainable = [p for n, p in net.named_parameters() if n != "2.bias"]
    net[2].bias.requires_grad_(False)
    before = optimizer_class(param_groups(net), **kwargs)
    train(before, trainable)
    expected = state_by_name(before, net)
    saved_layout = layout_of(before.param_groups, net)

    net[2].bias.requires_grad_(True)  # new: starts fresh
    net[1].weight.requires_grad_(False)  # dropped
    groups = param_groups(
        net, no_decay_param_names=("bias", "0.weight"), weight_decay_multipliers={"2.*": 2.0}, weight_decay=0.1
    )
    after = optimizer_class(groups, **kwargs)
    current = layout_of(after.param_groups, net)
    after.load_state_dict(remap_optimizer_state(before.state_dict(), saved_layout, current, after.param_groups))

    del expected["1.weight"]
    assert_same_state(state_by_name(after, net), expected)
    assert net[2].bias not in after.state
    assert [(g["name"], len(g["params"])) for g in after.param_groups] == [
        ("no_decay", 4),
        ("decay_x2", 1),
    ]


def test_remap_optimizer_state_hyperparameters_follow_the_source_group():
    """Test that an LR changed by a schedule survives, and a renamed group keeps its own weight decay."""
    net = small_net()
    before = torch.optim.AdamW(param_groups(net), lr=0.1, weight_decay=0.1)
    before.param_groups[0]["lr"] = 0.05  # as an LR schedule would
    before.param_groups[1]["lr"] = 0.07
    saved_layout = layout_of(before.param_groups, net)
    groups = param_groups(net, weight_decay_multipliers={"2.weight": 3.0}, weight_decay=0.1)
    after = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    current = layout_of(after.param_groups, net)
    after.load_state_dict(remap_optimizer_state(before.state_dict(), saved_layout, current, after.param_groups))
    got = [(g["name"], g["lr"], g["weight_decay"]) for g in after.param_groups]
    assert got == [("decay", 0.05, 0.1), ("no_decay", 0.07, 0.0), ("decay_x3", 0.05, pytest.approx(0.3))]


def test_remap_optimizer_state_refuses_a_layout_that_does_not_fit_the_state():
    """Test that a saved layout inconsistent with its state is refused, not guessed."""
    net = small_net()
    optimizer = torch.optim.AdamW(param_groups(net))
    wrong = Layout((GroupLayout("decay", ("0.weight",)), GroupLayout("no_decay", ())))
    current = layout_of(optimizer.param_groups, net)
    with pytest.raises(ValueError, match="does not match its optimizer state"):
        remap_optimizer_state(optimizer.state_dict(), wrong, current, optimizer.param_groups)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.9**step),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
            milestones=[2],
        ),
    ],
)
def test_remap_scheduler_state_follows_groups(make_scheduler):
    """Test that per-group scheduler lists follow the groups: source entries for known groups, current for new."""
    net = small_net()
    before = torch.optim.SGD(param_groups(net), lr=0.1, weight_decay=0.1)
    before.param_groups[1]["lr"] = 0.3
    scheduler = make_scheduler(before)
    for _ in range(3):
        before.step()
        scheduler.step()
    saved_layout = layout_of(before.param_groups, net)
    stray = nn.Parameter(torch.ones(1))
    groups = param_groups(net, weight_decay_multipliers={"2.weight": 2.0}, weight_decay=0.1)
    after = torch.optim.SGD([*groups, {"params": [stray], "lr": 0.2}], lr=0.1, weight_decay=0.1)
    after_scheduler = make_scheduler(after)
    fresh_last_lr = after_scheduler.get_last_lr()[3]
    sources = source_groups(saved_layout, layout_of(after.param_groups, net))
    assert sources == [0, 1, 0, None]
    after_scheduler.load_state_dict(
        remap_scheduler_state(scheduler.state_dict(), after_scheduler.state_dict(), sources, 2)
    )
    saved_last = scheduler.get_last_lr()
    assert after_scheduler.get_last_lr() == [saved_last[0], saved_last[1], saved_last[0], fresh_last_lr]
    for inner in getattr(after_scheduler, "_schedulers", [after_scheduler]):  # SequentialLR nests its schedulers
        assert inner.base_lrs == [0.1, 0.3, 0.1, 0.2]
    assert after_scheduler.last_epoch == scheduler.last_epoch == 3


def test_resume_layouts_same_layout_changes_nothing():
    """Test that an unchanged layout leaves the checkpoint as it was and logs nothing."""
    net = small_net()
    optimizer = torch.optim.AdamW(param_groups(net))
    train(optimizer, list(net.parameters()))
    checkpoint = {"optimizer_states": [optimizer.state_dict()]}
    save_layouts(checkpoint, [optimizer], net)
    states = checkpoint["optimizer_states"][0]
    assert resume_layouts(checkpoint, [optimizer], net) == []
    assert checkpoint["optimizer_states"][0] is states


def test_resume_layouts_remap_rewrites_the_checkpoint_and_reports():
    """Test that `remap` rewrites the state in place and reports every moved parameter."""
    net = small_net()
    before = torch.optim.AdamW(param_groups(net), weight_decay=0.1)
    train(before, list(net.parameters()))
    checkpoint = {"optimizer_states": [before.state_dict()]}
    save_layouts(checkpoint, [before], net)
    after = torch.optim.AdamW(param_groups(net, no_decay_param_names=("bias", "2.weight")), weight_decay=0.1)
    [message] = resume_layouts(checkpoint, [after], net)
    assert "`2.weight`: `decay` -> `no_decay`" in message
    after.load_state_dict(checkpoint["optimizer_states"][0])
    assert_same_state(state_by_name(after, net), state_by_name(before, net))


def test_resume_layouts_error_policy_lists_differences():
    """Test that `error` raises with every difference and the ways forward."""
    net = small_net()
    before = torch.optim.AdamW(param_groups(net))
    checkpoint = {"optimizer_states": [before.state_dict()]}
    save_layouts(checkpoint, [before], net)
    after = torch.optim.AdamW(param_groups(net, no_decay_param_names=("bias", "0.weight")))
    with pytest.raises(LayoutMismatchError, match=r"(?s)`0.weight`: `decay` -> `no_decay`.*on_layout_change = 'remap'"):
        resume_layouts(checkpoint, [after], net, on_layout_change="error")
