"""The param-group layout of an optimizer (``lightning_nodecay._layout``): names, and what changed between two."""

import pytest
import torch
from models import norm_mlp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_nodecay import param_groups
from lightning_nodecay._layout import GroupLayout, Layout, compare_layouts, layout_of


def test_layout_of_names_groups_and_parameters():
    """Test that the layout lists group names and cleaned parameter names in optimizer order."""
    net = norm_mlp()
    optimizer = torch.optim.AdamW(param_groups(net))
    assert layout_of(optimizer.param_groups, net) == Layout(
        (
            GroupLayout("decay", ("0.weight", "2.weight")),
            GroupLayout("no_decay", ("0.bias", "1.weight", "1.bias", "2.bias")),
        )
    )


def test_layout_of_unnamed_groups_wrappers_and_foreign_parameters():
    """Test `pgN` names for unnamed groups, wrapper segments removed, `?` for parameters outside the module."""
    net = norm_mlp()
    wrapped = nn.Sequential(checkpoint_wrapper(net))
    stray = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [net[0].weight]}, {"params": [net[1].bias, stray]}], lr=0.1)
    assert layout_of(optimizer.param_groups, wrapped).to_state() == [
        {"name": "pg1", "params": ["0.0.weight"]},
        {"name": "pg2", "params": ["0.1.bias", "?pg2[1]"]},
    ]


def test_layout_of_refuses_a_parameter_given_twice():
    """Test that a parameter listed twice is named, with the fix."""
    net = norm_mlp()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = torch.optim.AdamW([p for m in net.modules() for p in m.parameters()], weight_decay=0.1)
    with pytest.raises(ValueError, match=r"holds parameter `0.weight` twice.*not from `self.modules\(\)`"):
        layout_of(optimizer.param_groups, net)


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
