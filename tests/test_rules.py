"""The rules (``lightning_nodecay.rules``): default module types, the norm-name rule, and ``GroupRules`` validation."""

import math

import pytest
from models import TanhNet, tanh_mlp
from torch import nn

from lightning_nodecay import DEFAULT_NO_DECAY_MODULE_TYPES, GroupRules, decide, norm_by_class_name
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


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, True, "2", None])
def test_multipliers_refuse_bad_values(value):
    """Test that a negative, NaN, infinite or non-number multiplier is refused, naming its key."""
    with pytest.raises(ValueError, match=r"`weight_decay_multipliers\['head\.\*'\]` is .*finite float >= 0"):
        GroupRules(weight_decay_multipliers={"head.*": value})


def test_multipliers_refuse_non_mapping_and_unmatched_pattern():
    """Test that a non-dict is refused and, with `strict`, a multiplier pattern that matches nothing."""
    with pytest.raises(TypeError, match=r"`weight_decay_multipliers` must be a dict"):
        GroupRules(weight_decay_multipliers=[("2.weight", 2.0)])
    with pytest.raises(ValueError, match=r"`weight_decay_multipliers` pattern `2.weigth`.*Did you mean `2.weight`"):
        decide(tanh_mlp(), GroupRules(weight_decay_multipliers={"2.weigth": 2.0}))
    rules = GroupRules(weight_decay_multipliers={"x.*": 2.0}, strict=False)
    assert all(d.multiplier in (0, 1) for d in decide(tanh_mlp(), rules))


def test_l1_rules_refuse_bad_declarations():
    """Test that a bare string and an unmatched L1 pattern are refused with the argument's name."""
    with pytest.raises(TypeError, match=r"`weight_decay_l1` must be a tuple.*Wrap a single rule in a tuple"):
        GroupRules(weight_decay_l1="w")
    with pytest.raises(ValueError, match=r"`weight_decay_l1` pattern `ww` matches no parameter.*Did you mean `w`"):
        decide(TanhNet(), GroupRules(weight_decay_l1=("ww",)))
