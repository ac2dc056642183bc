"""Deciding each parameter's weight decay and building param groups (``lightning_nodecay.groups``)."""

import pytest
import torch
import torch.distributed as dist
from fits import free_port
from models import tanh_mlp
from oracles import OPTIMIZERS, assert_all_close, train
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_nodecay import (
    DEFAULT_NO_DECAY_MODULE_TYPES,
    DEFAULT_NO_DECAY_PARAM_NAMES,
    GroupRules,
    decide,
    param_groups,
)
from lightning_nodecay.groups import decided_group_name

WD = 0.1


def names_by_group(module, rules=None):
    """Map each group name to the qualified names of its parameters (names from the module itself)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(module, rules)}


class BasicBlock(nn.Module):
    def __init__(self, channels_in, channels_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))
            if stride != 1 or channels_in != channels_out
            else None
        )


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)


def test_param_groups_resnet_defaults():
    """Test that a ResNet-style CNN decays conv/linear weights and nothing of BatchNorm or biases."""
    groups = names_by_group(TinyResNet())
    assert groups["decay"] == [
        "stem.weight",
        "layer1.conv1.weight",
        "layer1.conv2.weight",
        "layer2.conv1.weight",
        "layer2.conv2.weight",
        "layer2.downsample.0.weight",
        "fc.weight",
    ]
    assert groups["no_decay"] == [
        "bn.weight",
        "bn.bias",
        "layer1.bn1.weight",
        "layer1.bn1.bias",
        "layer1.bn2.weight",
        "layer1.bn2.bias",
        "layer2.bn1.weight",
        "layer2.bn1.bias",
        "layer2.bn2.weight",
        "layer2.bn2.bias",
        "layer2.downsample.1.weight",
        "layer2.downsample.1.bias",
        "fc.bias",
    ]


def test_param_groups_seed_prelu_sequential():
    """Test the seed's PReLU CNN: conv layers decay, PReLU slopes and biases do not."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(4), nn.Conv2d(4, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 3))
    assert names_by_group(model) == {
        "decay": ["0.weight", "2.weight", "4.weight"],
        "no_decay": ["0.bias", "1.weight", "2.bias", "3.weight", "4.bias"],
    }


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, dim=8, tie=True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.attn = nn.MultiheadAttention(dim, 2)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight


def test_param_groups_transformer_tied_embeddings_decayed_once():
    """Test that a tied input/output embedding is decayed by default and listed only once."""
    model = TinyTransformer()
    groups = param_groups(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert names_by_group(model) == {
        "decay": ["pos_embed", "tok_emb.weight", "attn.in_proj_weight", "attn.out_proj.weight"],
        "no_decay": ["attn.in_proj_bias", "attn.out_proj.bias", "ln.weight", "ln.bias"],
    }


def test_param_groups_tied_no_decay_wins_on_either_path():
    """Test that a tied parameter excluded on one path is excluded, whichever path comes first."""
    model = TinyTransformer()
    with_embedding = DEFAULT_NO_DECAY_MODULE_TYPES + (nn.Embedding,)
    decisions = {d.name: d for d in decide(model, GroupRules(no_decay_module_types=with_embedding))}
    assert decisions["tok_emb.weight"].multiplier == 0
    assert decisions["tok_emb.weight"].reason == "module type `Embedding`"
    # excluded only through the second path (`head`), reached after the decayed first path
    rules = GroupRules(no_decay_param_names=("bias", "*_bias", "head.weight"))
    decisions = {d.name: d for d in decide(model, rules)}
    assert decisions["tok_emb.weight"].multiplier == 0
    assert decisions["tok_emb.weight"].reason == "tied to `head.weight`: name pattern `head.weight`"


def test_param_groups_shared_module_judged_on_every_path():
    """Test that a module shared at two paths is excluded when a pattern names either path."""
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    decisions = decide(model, GroupRules(no_decay_param_names=("b.0.weight",)))
    assert [(d.name, d.multiplier) for d in decisions] == [("a.weight", 0.0), ("a.bias", 1.0)]


def test_param_groups_embedding_excluded_when_declared():
    """Test that embeddings decay by default and can be excluded by declaring `nn.Embedding`."""
    model = TinyTransformer(tie=False)
    assert "tok_emb.weight" in names_by_group(model)["decay"]
    groups = names_by_group(model, GroupRules(no_decay_module_types=DEFAULT_NO_DECAY_MODULE_TYPES + (nn.Embedding,)))
    assert "tok_emb.weight" in groups["no_decay"]


class MyRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Normalize(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class AdaNorm(nn.Module):
    """A conditional norm: its own scale is a norm parameter, its child projection is not."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.proj = nn.Linear(dim, dim)


def test_param_groups_custom_norm_classes_by_name():
    """Test that a custom norm class is excluded by name, its child Linear and `Normalize` are not."""
    model = nn.Sequential(nn.Linear(4, 4), MyRMSNorm(4), Normalize(4), AdaNorm(4))
    assert names_by_group(model) == {
        "decay": ["0.weight", "2.scale", "3.proj.weight"],
        "no_decay": ["0.bias", "1.weight", "3.gain", "3.proj.bias"],
    }


def test_param_groups_custom_norm_rule_can_be_switched_off():
    """Test that removing `norm_by_class_name` from the module types decays custom norms."""
    from lightning_nodecay import norm_by_class_name

    types = tuple(t for t in DEFAULT_NO_DECAY_MODULE_TYPES if t is not norm_by_class_name)
    groups = names_by_group(nn.Sequential(MyRMSNorm(4)), GroupRules(no_decay_module_types=types))
    assert groups == {"decay": ["0.weight"]}


def test_param_groups_frozen_backbone_left_out():
    """Test that frozen parameters are in no group and an all-frozen group is left out."""
    model = TinyResNet()
    for name, module in model.named_children():
        if name != "fc":
            module.requires_grad_(False)
    assert names_by_group(model) == {"decay": ["fc.weight"], "no_decay": ["fc.bias"]}
    model.fc.bias.requires_grad_(False)
    assert [g["name"] for g in param_groups(model)] == ["decay"]


class ViTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}  # timm lists tokens it may not have


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_scale = nn.Parameter(torch.ones(4))
        self.mlp = nn.Linear(4, 4)

    def no_weight_decay(self):
        return ["q_scale"]


def test_param_groups_no_weight_decay_declared_at_any_depth():
    """Test that `no_weight_decay()` on the root and on submodules excludes names relative to each."""
    decisions = {d.name: d for d in decide(nn.ModuleDict({"vit": ViTish()}))}
    assert decisions["vit.pos_embed"].reason == "declared by `vit.no_weight_decay()`"
    assert decisions["vit.blocks.1.q_scale"].reason == "declared by `vit.blocks.1.no_weight_decay()`"
    assert [n for n, d in decisions.items() if d.multiplier == 1] == [
        "vit.blocks.0.mlp.weight",
        "vit.blocks.1.mlp.weight",
        "vit.head.weight",
    ]


def test_param_groups_declared_activation_answers_the_seed():
    """Test the seed's question: a new activation whose learned parameters are not regularized."""

    class LearnedSwish(nn.Module):
        def __init__(self):
            super().__init__()
            self.beta = nn.Parameter(torch.ones(1))

        def no_weight_decay(self):
            return {"beta"}

    model = nn.Sequential(nn.Linear(2, 2, bias=False), LearnedSwish())
    assert names_by_group(model) == {"decay": ["0.weight"], "no_decay": ["1.beta"]}


class Wrapper(nn.Module):
    """Registers its child under a wrapper segment name, as FSDP1 does."""

    def __init__(self, module, segment="_fsdp_wrapped_module"):
        super().__init__()
        self.add_module(segment, module)


def test_param_groups_same_names_when_wrapped_or_compiled():
    """Test that wrapper segments and wrapper modules do not change decisions or reasons."""
    plain = TinyTransformer(tie=False)
    patterns = DEFAULT_NO_DECAY_PARAM_NAMES + ("**.pos_embed", "attn.out_proj.weight")
    rules = GroupRules(no_decay_param_names=patterns)
    expected = [(d.name, d.multiplier, d.reason) for d in decide(plain, rules)]
    wrapped = nn.Module()
    wrapped.add_module("_orig_mod", plain)
    for model in (
        wrapped,
        Wrapper(plain),
        checkpoint_wrapper(plain),
        nn.DataParallel(plain),
        torch.compile(plain),
        nn.DataParallel(Wrapper(checkpoint_wrapper(plain), "_orig_mod")),
    ):
        got = [(d.name, d.multiplier, d.reason) for d in decide(model, rules)]
        assert got == expected, type(model).__name__


def test_param_groups_compiled_submodule():
    """Test that a `torch.compile`d submodule gives the same groups as the plain one."""
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    expected = names_by_group(model)
    model[1] = torch.compile(model[1])
    got = {k: [n.replace("_orig_mod.", "") for n in v] for k, v in names_by_group(model).items()}
    assert got == expected


def test_param_groups_order_names_and_keys():
    """Test the contract: `decay` then `no_decay`, names, `weight_decay` only on `no_decay`."""
    groups = param_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "weight_decay" not in groups[0]
    assert groups[1]["weight_decay"] == 0.0
    assert [g["weight_decay_multiplier"] for g in groups] == [1.0, 0.0]


def test_param_groups_only_decay_group_gets_optimizer_weight_decay():
    """Test that an optimizer's `weight_decay` reaches the decay group and no other, for many optimizers."""
    model = TinyResNet()
    for optimizer_class in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop):
        optimizer = optimizer_class(param_groups(model), lr=0.1, weight_decay=0.3)
        assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [
            ("decay", 0.3),
            ("no_decay", 0.0),
        ]


def test_param_groups_optimizer_step_leaves_no_decay_params_alone():
    """Test that one SGD step with zero gradients shrinks decayed weights only (oracle: w * (1 - lr*wd))."""
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(param_groups(model), lr=0.5, weight_decay=0.2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    weight, bias, slope = before
    torch.testing.assert_close(model[0].weight, weight * (1 - 0.5 * 0.2))
    torch.testing.assert_close(model[0].bias, bias)
    torch.testing.assert_close(model[1].weight, slope)


def test_param_groups_empty_model_gives_no_groups():
    """Test that a model without trainable parameters gives an empty list."""
    assert param_groups(nn.ReLU()) == []


def test_param_groups_user_pattern_matching_nothing_raises_with_suggestion():
    """Test that a typo in a declared pattern raises, names the pattern and suggests a fix."""
    with pytest.raises(ValueError, match=r"`pos_emebd` matches no parameter.*Did you mean `pos_embed`"):
        param_groups(TinyTransformer(), GroupRules(no_decay_param_names=("bias", "pos_emebd")))


def test_param_groups_unmatched_pattern_allowed_when_not_strict():
    """Test that `strict=False` accepts a pattern that matches nothing, and defaults never raise."""
    groups = param_groups(TinyTransformer(), GroupRules(no_decay_param_names=("bias", "reg_token"), strict=False))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    param_groups(nn.Linear(2, 2, bias=False))  # no bias anywhere: the default patterns stay silent


def test_param_groups_pattern_matching_only_frozen_parameters_is_not_a_typo():
    """Test that a pattern naming a frozen parameter is accepted (fine-tuning keeps its declarations)."""
    model = TinyTransformer(tie=False)
    model.pos_embed.requires_grad_(False)
    groups = names_by_group(model, GroupRules(no_decay_param_names=("bias", "pos_embed")))
    assert all("pos_embed" not in names for names in groups.values())


def test_param_groups_multipliers_need_weight_decay():
    """Test that multiplier groups without a base `weight_decay` raise instead of silently using 1x."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\['decay_x2'\] scale the optimizer's weight decay.*`weight_decay=`"):
        param_groups(model, GroupRules(weight_decay_multipliers={"1.*": 2.0}))
    groups = param_groups(model, GroupRules(weight_decay_multipliers={"1.*": 2.0}), weight_decay=0.1)
    assert [(g["name"], g.get("weight_decay")) for g in groups] == [
        ("decay", None),
        ("no_decay", 0.0),
        ("decay_x2", 0.2),
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multipliers_rule_equals_group_with_scaled_weight_decay(name):
    """Test that a 2.0 rule for 20 steps equals a hand-built group with twice the weight decay."""
    ruled, by_hand = tanh_mlp(), tanh_mlp()
    groups = param_groups(ruled, GroupRules(weight_decay_multipliers={"2.weight": 2.0}), weight_decay=WD)
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
    assert {
        d.name: d.multiplier for d in decide(tanh_mlp(), GroupRules(weight_decay_multipliers=multipliers))
    } == expected


def test_multipliers_tied_parameter_takes_smallest_over_paths():
    """Test that a parameter reached through two paths gets the smallest multiplier of both."""
    net = tanh_mlp()
    net.append(net[0])  # `3.weight` is `0.weight`
    decisions = decide(net, GroupRules(weight_decay_multipliers={"0.weight": 2.0, "3.weight": 0.5}))
    (tied,) = [d for d in decisions if d.param is net[0].weight]
    assert (tied.name, tied.multiplier, tied.reason) == (
        "0.weight",
        0.5,
        "tied to `3.weight`: multiplier rule `3.weight`",
    )


def test_multipliers_group_names_stay_unique():
    """Test that multipliers equal to 6 significant digits still get distinct group names."""
    net = tanh_mlp()
    rules = GroupRules(weight_decay_multipliers={"0.weight": 0.1234567, "2.weight": 0.1234568})
    groups = param_groups(net, rules, weight_decay=1)
    names = [g["name"] for g in groups]
    assert names == ["no_decay", "decay_x0.1234567", "decay_x0.1234568"]
    assert decided_group_name(0.5) == "decay_x0.5"


def test_l1_rules_decide_penalty_and_groups():
    """Test that L1 rules switch decayed parameters to L1 groups and leave excluded ones excluded."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.LayerNorm(2))
    decisions = decide(
        net, GroupRules(weight_decay_l1=("1.*", nn.LayerNorm), weight_decay_multipliers={"0.weight": 2.0})
    )
    assert [(d.name, d.multiplier, d.penalty, d.group) for d in decisions] == [
        ("0.weight", 2.0, "l2", "decay_x2"),
        ("0.bias", 0.0, "l2", "no_decay"),
        ("1.weight", 1.0, "l1", "decay_l1"),
        ("1.bias", 0.0, "l2", "no_decay"),
        ("2.weight", 0.0, "l2", "no_decay"),
        ("2.bias", 0.0, "l2", "no_decay"),
    ]
    assert decisions[2].reason == "L1 rule `1.*`"
    rules = GroupRules(weight_decay_l1=("*",), weight_decay_multipliers={"0.weight": 2.0})
    groups = param_groups(net, rules, weight_decay=0.1)
    assert [(g["name"], g.get("weight_decay"), g.get("weight_decay_penalty")) for g in groups] == [
        ("no_decay", 0.0, None),
        ("decay_l1", None, "l1"),
        ("decay_x2_l1", pytest.approx(0.2), "l1"),
    ]


def test_param_groups_refuses_fsdp_flat_parameters():
    """Test that FSDP1 with `use_orig_params=False` raises and says to use `use_orig_params=True`."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(
            nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), use_orig_params=False, device_id=torch.device("cpu")
        )
        with pytest.raises(ValueError, match=r"`_flat_param` is an FSDP flat parameter.*use_orig_params=True"):
            param_groups(model)
        model = FullyShardedDataParallel(
            nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), use_orig_params=True, device_id=torch.device("cpu")
        )
        assert [len(g["params"]) for g in param_groups(model)] == [1, 3]
    finally:
        dist.destroy_process_group()
