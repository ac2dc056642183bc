"""Param-group layouts in checkpoints (``lightning_nodecay._checkpoint``): recorded at save, checked at resume."""

import io

import pytest
import torch
from models import norm_mlp
from oracles import assert_same_state, random_steps, state_by_name

from lightning_nodecay import GroupRules, LayoutMismatchError, param_groups
from lightning_nodecay._checkpoint import resume_layouts, save_layouts
from lightning_nodecay._layout import Layout, layout_of
from lightning_nodecay._schema import LAYOUTS


def test_layout_state_survives_a_weights_only_load():
    """Test that a saved layout is plain data that `torch.load(weights_only=True)` accepts."""
    net = norm_mlp()
    optimizer = torch.optim.AdamW(param_groups(net))
    checkpoint = {}
    save_layouts(checkpoint, [optimizer], net)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert Layout.from_state(loaded[LAYOUTS][0]) == layout_of(optimizer.param_groups, net)


def test_resume_layouts_same_layout_changes_nothing():
    """Test that an unchanged layout leaves the checkpoint as it was and logs nothing."""
    net = norm_mlp()
    optimizer = torch.optim.AdamW(param_groups(net))
    random_steps(optimizer, list(net.parameters()))
    checkpoint = {"optimizer_states": [optimizer.state_dict()]}
    save_layouts(checkpoint, [optimizer], net)
    states = checkpoint["optimizer_states"][0]
    assert resume_layouts(checkpoint, [optimizer], net) == []
    assert checkpoint["optimizer_states"][0] is states


def test_resume_layouts_remap_rewrites_the_checkpoint_and_reports():
    """Test that `remap` rewrites the state in place and reports every moved parameter."""
    net = norm_mlp()
    before = torch.optim.AdamW(param_groups(net), weight_decay=0.1)
    random_steps(before, list(net.parameters()))
    checkpoint = {"optimizer_states": [before.state_dict()]}
    save_layouts(checkpoint, [before], net)
    after = torch.optim.AdamW(
        param_groups(net, GroupRules(no_decay_param_names=("bias", "2.weight"))), weight_decay=0.1
    )
    [message] = resume_layouts(checkpoint, [after], net)
    assert "`2.weight`: `decay` -> `no_decay`" in message
    after.load_state_dict(checkpoint["optimizer_states"][0])
    assert_same_state(state_by_name(after, net), state_by_name(before, net))


def test_resume_layouts_error_policy_lists_differences():
    """Test that `error` raises with every difference and the ways forward."""
    net = norm_mlp()
    before = torch.optim.AdamW(param_groups(net))
    checkpoint = {"optimizer_states": [before.state_dict()]}
    save_layouts(checkpoint, [before], net)
    after = torch.optim.AdamW(param_groups(net, GroupRules(no_decay_param_names=("bias", "0.weight"))))
    with pytest.raises(LayoutMismatchError, match=r"(?s)`0.weight`: `decay` -> `no_decay`.*on_layout_change = 'remap'"):
        resume_layouts(checkpoint, [after], net, on_layout_change="error")
