"""Moving saved optimizer and LR-scheduler state to changed param groups by name (``lightning_nodecay._remap``)."""

import pytest
import torch
from models import norm_mlp
from oracles import assert_same_state, random_steps, state_by_name
from torch import nn

from lightning_nodecay import GroupRules, param_groups
from lightning_nodecay._layout import GroupLayout, Layout, layout_of
from lightning_nodecay._remap import remap_optimizer_state, remap_scheduler_state, source_groups


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
    net = norm_mlp()
    before = torch.optim.AdamW(param_groups(net), lr=0.1, weight_decay=0.1)
    random_steps(before, list(net.parameters()))
    saved = before.state_dict()
    reordered = [{**g, "params": list(reversed(g["params"]))} for g in param_groups(net)]
    after = torch.optim.AdamW(reordered, lr=0.1, weight_decay=0.1)
    after.load_state_dict(saved)  # no error
    assert not torch.equal(after.state[net[0].weight]["exp_avg"], before.state[net[0].weight]["exp_avg"])


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_remap_optimizer_state_moves_state_by_name(optimizer_class):
    """Test that every parameter gets exactly its own saved state in a new grouping; new ones start fresh."""
    net = norm_mlp()
    kwargs = {"lr": 0.1, "weight_decay": 0.1} | ({"momentum": 0.9} if optimizer_class is torch.optim.SGD else {})
    trainable = [p for n, p in net.named_parameters() if n != "2.bias"]
    net[2].bias.requires_grad_(False)
    before = optimizer_class(param_groups(net), **kwargs)
    random_steps(before, trainable)
    expected = state_by_name(before, net)
    saved_layout = layout_of(before.param_groups, net)

    net[2].bias.requires_grad_(True)  # new: starts fresh
    net[1].weight.requires_grad_(False)  # dropped
    rules = GroupRules(no_decay_param_names=("bias", "0.weight"), weight_decay_multipliers={"2.*": 2.0})
    groups = param_groups(net, rules, weight_decay=0.1)
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
    net = norm_mlp()
    before = torch.optim.AdamW(param_groups(net), lr=0.1, weight_decay=0.1)
    before.param_groups[0]["lr"] = 0.05  # as an LR schedule would
    before.param_groups[1]["lr"] = 0.07
    saved_layout = layout_of(before.param_groups, net)
    groups = param_groups(net, GroupRules(weight_decay_multipliers={"2.weight": 3.0}), weight_decay=0.1)
    after = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    current = layout_of(after.param_groups, net)
    after.load_state_dict(remap_optimizer_state(before.state_dict(), saved_layout, current, after.param_groups))
    got = [(g["name"], g["lr"], g["weight_decay"]) for g in after.param_groups]
    assert got == [("decay", 0.05, 0.1), ("no_decay", 0.07, 0.0), ("decay_x3", 0.05, pytest.approx(0.3))]


def test_remap_optimizer_state_refuses_a_layout_that_does_not_fit_the_state():
    """Test that a saved layout inconsistent with its state is refused, not guessed."""
    net = norm_mlp()
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
    net = norm_mlp()
    before = torch.optim.SGD(param_groups(net), lr=0.1, weight_decay=0.1)
    before.param_groups[1]["lr"] = 0.3
    scheduler = make_scheduler(before)
    for _ in range(3):
        before.step()
        scheduler.step()
    saved_layout = layout_of(before.param_groups, net)
    stray = nn.Parameter(torch.ones(1))
    groups = param_groups(net, GroupRules(weight_decay_multipliers={"2.weight": 2.0}), weight_decay=0.1)
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


def test_remap_moves_masks_and_references_with_their_parameters():
    """Test that the hook's masks and references, saved by parameter position, follow their parameters by name when
    the groups change (two same-shape weights that swap positions would otherwise swap masks silently)."""
    from lightning_nodecay import WeightDecayHook, attach_weight_decay_hook, decide

    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    rules = GroupRules(weight_decay_toward={"0.*": "initial", "1.*": "initial"})
    before = torch.optim.AdamW(param_groups(net, rules), lr=0.1, weight_decay=0.1)
    masks = {"0.weight": torch.full((4, 1), 2.0), "1.weight": torch.full((4, 1), 3.0)}
    attach_weight_decay_hook(before, masks, module=net, decisions=decide(net, rules))
    references = {name: 10.0 * i + torch.zeros(4, 4) for i, name in enumerate(masks)}
    for reference, param in zip(references.values(), net.parameters(), strict=True):
        WeightDecayHook.of(before).references[param].copy_(reference)
    saved = before.state_dict()
    # the current run puts `1.weight` first, in a group of its own
    swapped = [{"name": "first", "params": [net[1].weight]}, {"name": "decay_to_init", "params": [net[0].weight]}]
    for group in swapped:
        group["weight_decay_target"] = "initial"
    after = torch.optim.AdamW(swapped, lr=0.1, weight_decay=0.1)
    hook = attach_weight_decay_hook(after, {"0.weight": torch.ones(4, 1), "1.weight": torch.ones(4, 1)}, module=net)
    remapped = remap_optimizer_state(
        saved, layout_of(before.param_groups, net), layout_of(after.param_groups, net), after.param_groups
    )
    after.load_state_dict(remapped)
    assert hook.named_masks()["0.weight"].unique().tolist() == [2.0]
    assert hook.named_masks()["1.weight"].unique().tolist() == [3.0]
    assert torch.equal(hook.references[net[0].weight], references["0.weight"])
    assert torch.equal(hook.references[net[1].weight], references["1.weight"])
