"""The summary of weight-decay decisions (``lightning_nodecay.summary``): groups, sizes, masks and reasons."""

import pytest
import torch
from models import TanhNet, tanh_mlp

from lightning_nodecay import GroupRules, decide, summarize


def test_summary_masks_keyed_by_parameter():
    """Test that `summarize` reports the mask share and the element-weighted effective multiplier."""
    net = TanhNet()
    summary = summarize(decide(net), masks={net.w: torch.tensor([[0.0], [0.0], [0.0], [1.0]])})
    (group,) = summary.groups
    assert (group.mask_share, group.effective_multiplier) == (pytest.approx(24 / 36), pytest.approx((6 + 12) / 36))


def test_multipliers_shown_in_summary():
    """Test that the summary lists multiplier groups and the rule behind them."""
    text = str(summarize(decide(tanh_mlp(), GroupRules(weight_decay_multipliers={"2.weight": 2.0}))))
    assert "2 | decay_x2 | x2    | 1       | 12" in text
    assert "multiplier rule `2.weight`: 1 tensor (2.weight)" in text
