import pytest
from torch import nn

from lightning_nodecay import DEFAULT_NO_DECAY_MODULE_TYPES, NamePatterns, clean_name, norm_by_class_name
from lightning_nodecay.rules import check_module_rules


@pytest.mark.parametrize(
    ("class_name", "expected"),
    [
        ("LlamaRMSNorm", True),
        ("T5LayerNorm", True),
        ("LayerNorm2d", True),
        ("BatchNormAct2d", True),
        ("FrozenBatchNorm2d", True),
        ("MyRMSNorm", True),
        ("GroupNorm1", True),
        ("LayerNormalization", True),
        ("Normalize", False),
        ("Normalizer", False),
        ("NormBlock", False),
        ("Normal", False),
        ("EnormousLinear", False),
        ("NormalizedLinear", False),
    ],
)
def test_norm_by_class_name_recognises_norm_classes(class_name, expected):
    """Test that custom norm classes are caught by name and look-alikes are not."""
    module = type(class_name, (nn.Module,), {})()
    assert norm_by_class_name(module) is expected


def test_default_module_types_cover_every_torch_norm():
    """Test that every norm layer of torch.nn and PReLU are caught by the default types."""
    torch_norms = [
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2),
        nn.BatchNorm3d(2),
        nn.SyncBatchNorm(2),
        nn.InstanceNorm1d(2, affine=True),
        nn.InstanceNorm2d(2, affine=True),
        nn.InstanceNorm3d(2, affine=True),
        nn.LayerNorm(2),
        nn.GroupNorm(1, 2),
        nn.LocalResponseNorm(2),
        nn.RMSNorm(2),
        nn.PReLU(),
    ]
    types = tuple(t for t in DEFAULT_NO_DECAY_MODULE_TYPES if isinstance(t, type))
    for module in torch_norms:
        assert isinstance(module, types), type(module).__name__


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
    ("name", "cleaned"),
    [
        ("layers._fsdp_wrapped_module.0.weight", "layers.0.weight"),
        ("_checkpoint_wrapped_module.norm.bias", "norm.bias"),
        ("backbone._orig_mod.conv.weight", "backbone.conv.weight"),
        ("a._fsdp_wrapped_module._checkpoint_wrapped_module.b", "a.b"),
        ("my_wrapped_module_x.weight", "my_wrapped_module_x.weight"),
    ],
)
def test_clean_name_removes_wrapper_segments(name, cleaned):
    """Test that only whole wrapper segments are removed."""
    assert clean_name(name) == cleaned


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (nn.LayerNorm, "Wrap a single type in a tuple"),
        ("LayerNorm", "must be a tuple or list"),
        ((nn.LayerNorm, "BatchNorm2d"), r"`no_decay_module_types\[1\]` is 'BatchNorm2d'"),
        ((int,), "`int`, which is not an `nn.Module` subclass"),
        ((nn.LayerNorm(3),), "pass its class `LayerNorm` instead"),
    ],
)
def test_check_module_rules_rejects_bad_entries(rules, message):
    """Test that wrong module rules raise an error naming the entry and the fix."""
    with pytest.raises(TypeError, match=message):
        check_module_rules(rules)


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
