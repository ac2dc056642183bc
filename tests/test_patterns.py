"""Parameter-name patterns (``lightning_nodecay._patterns``): the documented semantics and clear errors."""

import pytest
from torch import nn

from lightning_nodecay._patterns import NamePatterns


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("bias", "bias", True),
        ("bias", "encoder.0.bias", True),
        ("bias", "encoder.bias_scale", False),
        ("bias", "biased_proj.weight", False),
        ("*_bias", "attn.in_proj_bias", True),
        ("*_bias", "attn.q_bias", True),
        ("*_bias", "attn.bias", False),
        ("*_bias", "bias_scale", False),
        ("encoder.*.pos_embed", "encoder.stage1.pos_embed", True),
        ("encoder.*.pos_embed", "encoder.a.b.pos_embed", False),
        ("encoder.*.pos_embed", "decoder.stage1.pos_embed", False),
        ("encoder.**.pos_embed", "encoder.pos_embed", True),
        ("encoder.**.pos_embed", "encoder.a.b.pos_embed", True),
        ("*.cls_token", "model.cls_token", True),
        ("*.cls_token", "cls_token", False),
        ("**.cls_token", "cls_token", True),
        ("**.cls_token", "a.b.cls_token", True),
        ("blocks.**", "blocks.0.attn.weight", True),
        ("blocks.**", "blocksy.weight", False),
        ("blocks.[0-1].weight", "blocks.1.weight", True),
        ("blocks.[0-1].weight", "blocks.2.weight", False),
        ("blocks.[!0].weight", "blocks.2.weight", True),
        ("a.b[!x]c", "a.b.c", False),
        ("a.b[+-/]c", "a.b.c", False),
        ("a.b[+-/]c", "a.b-c", True),
        ("layer?.weight", "layer1.weight", True),
        ("layer?.weight", "layer.weight", False),
        ("a+b.weight", "a+b.weight", True),
        ("a+b.weight", "aab.weight", False),
    ],
)
def test_name_patterns_semantics(pattern, name, expected):
    """Test the documented pattern semantics: leaf vs qualified, `*` one segment, `**` any."""
    assert (NamePatterns((pattern,)).match(name) == pattern) is expected


def test_name_patterns_returns_first_matching_pattern():
    """Test that `match` reports which pattern fired, in declaration order."""
    patterns = NamePatterns(("bias", "**.bias", "pos_embed"))
    assert patterns.match("fc.bias") == "bias"
    assert patterns.match("pos_embed") == "pos_embed"
    assert patterns.match("fc.weight") is None


@pytest.mark.parametrize(
    ("patterns", "error", "message"),
    [
        ("bias", TypeError, r"Wrap a single pattern in a tuple: `\('bias',\)`"),
        ((3,), TypeError, r"`no_decay_param_names\[0\]` is 3 of type `int`"),
        ((nn.LayerNorm,), TypeError, "List module classes in `no_decay_module_types` instead"),
        (("",), ValueError, "empty segment"),
        (("encoder..pos",), ValueError, "empty segment"),
        (None, TypeError, "must be a tuple or list of strings"),
    ],
)
def test_name_patterns_reject_bad_patterns(patterns, error, message):
    """Test that wrong patterns raise an error naming the culprit and the fix."""
    with pytest.raises(error, match=message):
        NamePatterns(patterns)
