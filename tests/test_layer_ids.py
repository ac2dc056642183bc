"""Layer ids for layer-wise learning-rate decay (`_layer_ids.assign_layers`), against independent oracles.

The models below only need parameters, so they have no ``forward``.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import mae_layer_id, mae_scales
from torch import nn

from lightning_nodecay._layer_ids import LayerAssignment, assign_layers

DIM = 8
DECAY = 0.75


def tree(**children: nn.Module) -> nn.Module:
    """A plain container module with the given children, in order."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm, attention, LayerNorm, MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, num_heads=2, batch_first=True)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))


class ViT(nn.Module):
    """A small ViT laid out like timm's and MAE's: tokens and patch embedding before `blocks`."""

    def __init__(self, depth: int = 4, patch: int = 4, image: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, DIM))
        self.patch_embed = tree(proj=nn.Conv2d(3, DIM, patch, stride=patch))
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, classes)


class TimmViT(ViT):
    """The ViT with timm's `VisionTransformer.group_matcher`."""

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])


def names_of(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_vit_block_list_equals_mae():
    """Test that the block-list ids and scales of a ViT are MAE's."""
    model = ViT()
    layers = assign_layers(model)
    mae_num_layers = len(model.blocks) + 1
    assert layers.origin == "blocks"
    assert layers.ids == {name: mae_layer_id(name, mae_num_layers) for name in names_of(model)}
    assert layers.num_layers == mae_num_layers + 1  # MAE counts the head's id as `num_layers`
    assert {name: layers.scale(name, DECAY) for name in names_of(model)} == pytest.approx(mae_scales(model, DECAY))


def test_vit_block_list_sources():
    """Test that each source names the block list and the block."""
    layers = assign_layers(ViT())
    assert layers.sources["cls_token"] == "before `blocks`"
    assert layers.sources["patch_embed.proj.weight"] == "before `blocks`"
    assert layers.sources["blocks.2.attn.in_proj_weight"] == "block `blocks.2`"
    assert layers.sources["norm.weight"] == layers.sources["head.bias"] == "after `blocks`"


def test_scale_of_the_last_layer_is_one():
    """Test that `scale` is `decay ** (num_layers - 1 - id)`."""
    layers = LayerAssignment({"a": 0, "b": 1, "c": 2}, 3, {"a": "", "b": "", "c": ""}, "declared")
    assert [layers.scale(name, 0.5) for name in "abc"] == [0.25, 0.5, 1.0]


# -- timm's group_matcher -------------------------------------------------------------------------


def test_vit_group_matcher_follows_timm():
    """Test timm's ids for its ViT matcher: `norm` (suffix 99999) joins the last block, the unmatched head is last."""
    model = TimmViT()
    # ordinal keys, by hand: stem (0,); blocks.i (1, i); norm (1, 99999) -> previous id; head unmatched (inf,)
    expected = {}
    for name in names_of(model):
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            expected[name] = 0
        elif name.startswith("blocks."):
            expected[name] = int(name.split(".")[1]) + 1
        elif name.startswith("norm."):
            expected[name] = 4
        else:
            assert name.startswith("head.")
            expected[name] = 5
    layers = assign_layers(model)
    assert layers.origin == "group_matcher"
    assert layers.ids == expected
    assert layers.num_layers == 6
    assert layers.scale("head.weight", DECAY) == 1.0
    assert layers.scale("norm.weight", DECAY) == layers.scale("blocks.3.mlp.0.weight", DECAY) == DECAY
    assert layers.sources["blocks.1.norm1.weight"] == r"group_matcher `^blocks\.(\d+)`"
    assert layers.sources["head.weight"] == "group_matcher: no match, last layer"


class Stage(nn.Module):
    def __init__(self, dim_in: int, dim: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = nn.Conv2d(dim_in, dim, 2, stride=2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=1))


class ConvNeXtLike(nn.Module):
    """Stages of blocks, with timm's `ConvNeXt.group_matcher` (a stage's downsample shares block 0's key)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.GroupNorm(1, 4))
        self.stages = nn.Sequential(Stage(4, 4, downsample=False), Stage(4, 8, downsample=True))
        self.norm_pre = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )


def test_convnext_group_matcher_merges_equal_keys():
    """Test timm's ids when two rules give the same key, and that the matcher wins over a `blocks` list."""
    # keys by hand: stem (0,); stages.0.blocks.j (1, 0, j); stages.1.downsample (1, 1, 0) = stages.1.blocks.0;
    # stages.1.blocks.1 (1, 1, 1); norm_pre (1, 99999) -> previous id; head (inf,)
    expected_by_prefix = {
        "stem.": 0,
        "stages.0.blocks.0.": 1,
        "stages.0.blocks.1.": 2,
        "stages.1.downsample.": 3,
        "stages.1.blocks.0.": 3,
        "stages.1.blocks.1.": 4,
        "norm_pre.": 4,
        "head.": 5,
    }
    model = ConvNeXtLike()
    layers = assign_layers(model)
    expected = {n: i for n in names_of(model) for prefix, i in expected_by_prefix.items() if n.startswith(prefix)}
    assert layers.ids == expected
    assert len(expected) == len(names_of(model))
    assert layers.num_layers == 6


def test_group_matcher_plain_regex_strings_in_a_list():
    """Test the extension: plain regexes in a group's list act as `(regex, None)`."""

    class Plain(TimmViT):
        def group_matcher(self, coarse: bool = False) -> dict[str, object]:
            return dict(stem=[r"^cls_token", r"^pos_embed", r"^patch_embed"], blocks=super().group_matcher()["blocks"])

    assert assign_layers(Plain()).ids == assign_layers(TimmViT()).ids


class CallableMatched(nn.Module):
    """A model whose `group_matcher` is a callable, the head joining the last block through 99999."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, DIM)
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(2))
        self.head = nn.Linear(DIM, 2)

    def group_matcher(self, coarse: bool = False) -> object:
        def ordinal(name: str) -> int | tuple[int, ...]:
            if name.startswith("embed."):
                return 0
            if name.startswith("blocks."):
                return (1, int(name.split(".")[1]))
            return (99999,)

        return ordinal


def test_callable_group_matcher_follows_timm():
    """Test timm's ids for a callable matcher: keys (0,), (1, 0), (1, 1), (99999,) give 0, 1, 2, 2."""
    layers = assign_layers(CallableMatched())
    assert layers.ids == {
        "embed.weight": 0,
        "blocks.0.weight": 1,
        "blocks.0.bias": 1,
        "blocks.1.weight": 2,
        "blocks.1.bias": 2,
        "head.weight": 2,
        "head.bias": 2,
    }
    assert layers.num_layers == 3
    assert set(layers.sources.values()) == {"group_matcher (callable)"}


@pytest.mark.parametrize(
    ("matcher", "message"),
    [
        ([(r"^blocks", None)], "returned"),
        (dict(blocks=r"^(blocks)\.(\d+)"), "capture digits only"),
        (dict(blocks=r"^blocks\.(\d+)|^norm"), "capture digits only"),
        (dict(blocks=[(r"^blocks\.(\d+)", 99999)]), "suffix is `None` or a tuple of numbers"),
        (dict(blocks=(r"^blocks\.(\d+)", None)), "each entry must be a regex"),
        (dict(blocks=r"^blocks\.(\d+"), "invalid regex"),
        (lambda name: "blocks", "a number or a non-empty tuple of numbers"),
        (lambda name: (), "a number or a non-empty tuple of numbers"),
    ],
)
def test_unsupported_group_matcher_raises(matcher, message):
    """Test that a matcher timm's rule cannot order raises naming `group_matcher()`."""

    class Odd(ViT):
        def group_matcher(self, coarse: bool = False) -> object:
            return matcher

    with pytest.raises(ValueError, match=re.escape(message)) as error:
        assign_layers(Odd())
    assert "`Odd.group_matcher" in str(error.value)


# -- block lists of common architectures ------------------------------------------------------------


def bert_like(depth: int = 3) -> nn.Module:
    layer = [
        tree(attention=nn.Linear(DIM, DIM), intermediate=nn.Linear(DIM, 2 * DIM), output=nn.Linear(2 * DIM, DIM))
        for _ in range(depth)
    ]
    return tree(
        embeddings=tree(word_embeddings=nn.Embedding(20, DIM), position_embeddings=nn.Embedding(6, DIM)),
        encoder=tree(layer=nn.ModuleList(layer)),
        pooler=tree(dense=nn.Linear(DIM, DIM)),
    )


def gpt2_like(depth: int = 3) -> nn.Module:
    h = [tree(ln_1=nn.LayerNorm(DIM), attn=nn.Linear(DIM, 3 * DIM), mlp=nn.Linear(DIM, DIM)) for _ in range(depth)]
    model = tree(
        transformer=tree(
            wte=nn.Embedding(20, DIM), wpe=nn.Embedding(6, DIM), h=nn.ModuleList(h), ln_f=nn.LayerNorm(DIM)
        ),
        lm_head=nn.Linear(DIM, 20, bias=False),
    )
    model.lm_head.weight = model.transformer.wte.weight  # tied: named once, as `transformer.wte.weight`
    return model


def llama_like(depth: int = 3) -> nn.Module:
    layers = [
        tree(self_attn=nn.Linear(DIM, DIM, bias=False), mlp=nn.Linear(DIM, DIM), input_layernorm=nn.RMSNorm(DIM))
        for _ in range(depth)
    ]
    return tree(
        model=tree(embed_tokens=nn.Embedding(20, DIM), layers=nn.ModuleList(layers), norm=nn.RMSNorm(DIM)),
        lm_head=nn.Linear(DIM, 20, bias=False),
    )


@pytest.mark.parametrize(
    ("make", "before", "block_list", "after"),
    [
        (bert_like, ("embeddings.",), "encoder.layer", ("pooler.",)),
        (gpt2_like, ("transformer.wte.", "transformer.wpe."), "transformer.h", ("transformer.ln_f.",)),
        (llama_like, ("model.embed_tokens.",), "model.layers", ("model.norm.", "lm_head.")),
    ],
)
def test_common_architectures_use_their_block_list(make, before, block_list, after):
    """Test embeddings -> 0, block i -> i + 1, final norm, head and pooler -> depth + 1."""
    model = make(depth=3)

    def expected(name: str) -> int:
        if name.startswith(before):
            return 0
        if name.startswith(f"{block_list}."):
            return int(name[len(block_list) + 1 :].split(".")[0]) + 1
        assert name.startswith(after), name
        return 4

    layers = assign_layers(model)
    assert layers.ids == {name: expected(name) for name in names_of(model)}
    assert layers.num_layers == 5
    in_block_2 = next(name for name in names_of(model) if name.startswith(f"{block_list}.2."))
    assert layers.sources[in_block_2] == f"block `{block_list}.2`"


def test_tied_head_is_named_once():
    """Test that GPT-2's tied `lm_head.weight` is known under its first name only."""
    layers = assign_layers(gpt2_like())
    assert "lm_head.weight" not in layers.ids
    assert layers.ids["transformer.wte.weight"] == 0


# -- declared ids --------------------------------------------------------------------------------


def test_declared_mapping_first_match_wins():
    """Test own-name, `*` and `**` patterns, the first matching one deciding."""
    declared = {
        "cls_token": 0,
        "**.pos_embed": 0,
        "patch_embed.**": 0,
        "blocks.0.**": 1,
        "blocks.1.**": 1,
        "blocks.*.**": 2,
        "*": 3,
    }
    model = TimmViT()  # a declaration wins over `group_matcher()`

    def expected(name: str) -> int:
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith(("blocks.0.", "blocks.1.")):
            return 1
        return 2 if name.startswith("blocks.") else 3

    layers = assign_layers(model, declared)
    assert layers.origin == "declared"
    assert layers.ids == {name: expected(name) for name in names_of(model)}
    assert layers.num_layers == 4
    assert layers.sources["blocks.3.norm2.bias"] == "declared `blocks.*.**`"
    assert layers.sources["pos_embed"] == "declared `**.pos_embed`"


def test_declared_callable_equals_mae():
    """Test a callable declaration: MAE's rule declared gives MAE's ids."""
    model = ViT()
    layers = assign_layers(model, lambda name: mae_layer_id(name, 5))
    assert layers.ids == assign_layers(model).ids
    assert set(layers.sources.values()) == {"declared"}


def test_declared_mapping_must_cover_trainable_parameters():
    """Test that an uncovered trainable parameter raises naming it and the fix."""
    with pytest.raises(ValueError, match=r"`cls_token`, `pos_embed`, .* and \d+ more\. .*`'\*': <id>`"):
        assign_layers(ViT(), {"blocks.**": 1})


def test_declared_callable_must_cover_trainable_parameters_only():
    """Test that the callable may leave out frozen parameters, not trainable ones."""
    model = ViT()

    def blocks_only(name: str) -> int | None:
        return mae_layer_id(name, 5) if not name.startswith(("norm.", "head.")) else None

    with pytest.raises(ValueError, match=r"`norm.weight`, `norm.bias`, `head.weight`, `head.bias`\..*callable"):
        assign_layers(model, blocks_only)
    model.norm.requires_grad_(False)
    model.head.requires_grad_(False)
    layers = assign_layers(model, blocks_only)
    assert set(layers.ids) == {n for n in names_of(model) if not n.startswith(("norm.", "head."))}
    assert layers.num_layers == 5


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
def test_declared_id_must_be_a_non_negative_int(bad):
    """Test that a declared id other than a non-negative int raises, for mappings and callables."""
    with pytest.raises(ValueError, match=r"pattern `\*` is .*non-negative ints"):
        assign_layers(ViT(), {"*": bad})
    if bad is not None:  # a callable's `None` means "not covered"
        with pytest.raises(ValueError, match=r"answer for `cls_token`.*non-negative ints"):
            assign_layers(ViT(), lambda name: bad)


@pytest.mark.parametrize("declared", [{"blocks..norm": 0}, {"": 0}, {3: 0}, [("*", 0)]])
def test_declared_must_be_patterns_or_a_callable(declared):
    """Test that a malformed declaration raises saying what is expected."""
    with pytest.raises(ValueError, match=r"is not a name pattern|must be a mapping"):
        assign_layers(ViT(), declared)


# -- wrappers ----------------------------------------------------------------------------------


def wrap(inner: nn.Module, child: str) -> nn.Module:
    return tree(**{child: inner})


@pytest.mark.parametrize("child", ["module", "_forward_module", "_orig_mod", "_fsdp_wrapped_module"])
@pytest.mark.parametrize("declared", [None, {"blocks.**": 1, "*": 0}])
@pytest.mark.parametrize("make", [ViT, TimmViT])
def test_wrappers_change_nothing(child, declared, make):
    """Test that pure wrappers, nested or not, give the same ids, names and sources."""
    model = make()
    plain = assign_layers(model, declared)
    assert assign_layers(wrap(model, child), declared) == plain
    assert assign_layers(wrap(wrap(model, "_orig_mod"), child), declared) == plain


def test_wrapped_blocks_change_nothing():
    """Test that wrapper segments inside the model (activation checkpointing, FSDP) are dropped."""
    model = TimmViT()
    plain = assign_layers(model)
    model.blocks[1] = wrap(model.blocks[1], "_checkpoint_wrapped_module")
    model.blocks[2] = wrap(model.blocks[2], "_fsdp_wrapped_module")
    assert assign_layers(model) == plain
    fallback = ViT()
    plain_fallback = assign_layers(fallback)
    fallback.blocks[0] = wrap(fallback.blocks[0], "_checkpoint_wrapped_module")
    assert assign_layers(fallback) == plain_fallback


# -- no source ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)),
        tree(embed=nn.Linear(2, 2), blocks=nn.ModuleDict({"a": nn.Linear(2, 2)})),
        tree(embed=nn.Linear(2, 2), layers=nn.ModuleList([nn.ReLU(), nn.ReLU()]), head=nn.Linear(2, 2)),
        tree(embed=nn.Linear(2, 2), stages=nn.ModuleList([nn.Linear(2, 2)])),
    ],
)
def test_no_source_raises_with_the_fix(model):
    """Test the error when no declaration, no `group_matcher()` and no block list exist."""
    with pytest.raises(ValueError, match="found no source") as error:
        assign_layers(model)
    message = str(error.value)
    for needed in ("`group_matcher()`", "`blocks`, `layers`, `layer` or `h`", "callable"):
        assert needed in message


def test_no_parameters_raises():
    """Test that a model without parameters raises."""
    with pytest.raises(ValueError, match="`ReLU` has no parameters"):
        assign_layers(wrap(nn.ReLU(), "module"))


# -- property -------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    depth=st.integers(1, 6),
    stem=st.booleans(),
    head=st.booleans(),
    list_name=st.sampled_from(["blocks", "layers", "layer", "h"]),
    nested=st.booleans(),
)
def test_block_list_ids_are_monotone(depth, stem, head, list_name, nested):
    """Test that block-list ids follow `named_parameters()` order and the documented rule, at any depth."""
    children: dict[str, nn.Module] = {"stem": nn.Linear(2, 2)} if stem else {}
    children[list_name] = nn.ModuleList(tree(a=nn.Linear(2, 2), b=nn.LayerNorm(2)) for _ in range(depth))
    body = tree(**children)
    model = tree(body=body, head=nn.Linear(2, 2)) if head else tree(body=body)
    model = tree(net=model) if nested else model
    layers = assign_layers(model)
    ids = [layers.ids[name] for name in names_of(model)]
    assert ids == sorted(ids)
    assert layers.num_layers == depth + 1 + head
    for name in names_of(model):
        segments = name.split(".")
        if list_name in segments:
            assert layers.ids[name] == int(segments[segments.index(list_name) + 1]) + 1
        else:
            assert layers.ids[name] == (0 if "stem" in segments else depth + 1)
    assert layers.scale(names_of(model)[-1], DECAY) == 1.0
