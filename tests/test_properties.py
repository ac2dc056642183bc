"""Property tests of the grouping on random module trees, against a reference classifier written here."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fits import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_nodecay import decide, param_groups

# ---------------------------------------------------------------- the modules


class MyRMSNorm(nn.Module):
    def __init__(self, size=3):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * self.weight


class T5LayerNorm(MyRMSNorm):
    pass


class CrossNormalization(MyRMSNorm):
    pass


class ProjNorm(MyRMSNorm):
    """A norm-named module with a child projection: the projection is judged as a Linear."""

    def __init__(self, size=3):
        super().__init__(size)
        self.proj = nn.Linear(size, size)


class Normalize(nn.Module):
    """Look-alike: not a norm (name ends in `Normalize`), its weight decays."""

    def __init__(self, size=3):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))


class Normalizer(Normalize):
    pass


class NormBlock(Normalize):
    pass


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, size=3):
        super().__init__(size)
        self.act = nn.ReLU()


class LayerNorm2d(nn.LayerNorm):
    def __init__(self, size=3):
        super().__init__(size)


class Block(nn.Module):
    """A plain container whose children get attribute names."""


class FakeFSDP(nn.Module):
    """Inserts the `_fsdp_wrapped_module` segment, as FSDP1 does."""

    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module


LEAVES = {
    "linear": lambda: nn.Linear(3, 3),
    "linear_no_bias": lambda: nn.Linear(3, 3, bias=False),
    "conv1d": lambda: nn.Conv1d(3, 3, 1),
    "conv2d": lambda: nn.Conv2d(3, 3, 1),
    "embedding": lambda: nn.Embedding(5, 3),
    "bilinear": lambda: nn.Bilinear(3, 3, 3),
    "mha": lambda: nn.MultiheadAttention(4, 2),
    "batchnorm1d": lambda: nn.BatchNorm1d(3),
    "batchnorm2d": lambda: nn.BatchNorm2d(3),
    "batchnorm3d": lambda: nn.BatchNorm3d(3),
    "syncbatchnorm": lambda: nn.SyncBatchNorm(3),
    "lazybatchnorm1d": lambda: nn.LazyBatchNorm1d(),
    "instancenorm1d": lambda: nn.InstanceNorm1d(3, affine=True),
    "instancenorm2d": lambda: nn.InstanceNorm2d(3, affine=True),
    "instancenorm3d": lambda: nn.InstanceNorm3d(3, affine=True),
    "instancenorm_no_affine": lambda: nn.InstanceNorm2d(3),
    "layernorm": lambda: nn.LayerNorm(3),
    "layernorm_no_bias": lambda: nn.LayerNorm(3, bias=False),
    "groupnorm": lambda: nn.GroupNorm(1, 3),
    "rmsnorm": lambda: nn.RMSNorm(3),
    "localresponsenorm": lambda: nn.LocalResponseNorm(2),
    "prelu": lambda: nn.PReLU(),
    "prelu3": lambda: nn.PReLU(3),
    "my_rms_norm": MyRMSNorm,
    "t5_layer_norm": T5LayerNorm,
    "cross_normalization": CrossNormalization,
    "proj_norm": ProjNorm,
    "normalize": Normalize,
    "normalizer": Normalizer,
    "norm_block": NormBlock,
    "batchnorm_act": BatchNormAct2d,
    "layernorm2d": LayerNorm2d,
    "identity": nn.Identity,
    "empty_sequential": nn.Sequential,
    "relu": nn.ReLU,
}
CONTAINERS = ("sequential", "module_list", "module_dict", "block")
CHILD_NAMES = ("encoder", "head", "attn", "mlp", "norm", "stem", "proj", "blocks", "layer", "x")
DIRECT_PARAM_NAMES = ("scale", "gamma", "pos_bias", "bias", "weight", "cls_token", "biased", "bias_scale")

# ---------------------------------------------------------------- the reference classifier
# Written from the documented rules, independently of `lightning_nodecay`: a parameter gets no decay if on any
# path its owner is a torch norm layer or PReLU (by isinstance), or its owner's class name is one of the norm-named
# classes above, or its own name is `bias` or ends in `_bias`. Every name a module registers counts.

REFERENCE_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
)
REFERENCE_NORM_NAMES = {"MyRMSNorm", "T5LayerNorm", "CrossNormalization", "ProjNorm"}


def reference_no_decay(model):
    no_decay = set()
    for _, module in model.named_modules(remove_duplicate=False):
        owner_is_norm = isinstance(module, REFERENCE_NORM_TYPES) or type(module).__name__ in REFERENCE_NORM_NAMES
        for name, param in module._parameters.items():
            if param is not None and (owner_is_norm or name == "bias" or name.endswith("_bias")):
                no_decay.add(id(param))
    return no_decay


# ---------------------------------------------------------------- the strategy


@st.composite
def module_trees(draw, max_depth=3):
    pool = []  # finished modules, reusable as shared submodules (no cycles: they are built before their parents)

    def build(depth):
        if pool and draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from(pool))
        if depth >= max_depth or draw(st.integers(0, 2)) == 0:
            module = LEAVES[draw(st.sampled_from(sorted(LEAVES)))]()
        else:
            children = [build(depth + 1) for _ in range(draw(st.integers(0, 3)))]
            module = container(draw(st.sampled_from(CONTAINERS)), children)
            for name in draw(st.lists(st.sampled_from(DIRECT_PARAM_NAMES), max_size=2, unique=True)):
                if not hasattr(module, name):
                    module.register_parameter(name, nn.Parameter(torch.randn(3)))
        pool.append(module)
        return module

    def container(kind, children):
        if kind == "sequential":
            return nn.Sequential(*children)
        if kind == "module_list":
            return nn.ModuleList(children)
        names = draw(
            st.lists(st.sampled_from(CHILD_NAMES), min_size=len(children), max_size=len(children), unique=True)
        )
        module = nn.ModuleDict() if kind == "module_dict" else Block()
        for name, child in zip(names, children, strict=True):
            module.add_module(name, child)
        return module

    model = Block()
    for i in range(draw(st.integers(1, 3))):
        model.add_module(f"part{i}", build(1))
    tie(draw, model)
    initialized = [p for p in model.parameters() if not is_lazy(p)]
    for param in draw(st.lists(st.sampled_from(initialized or [None]), max_size=3)):
        if param is not None:
            param.requires_grad_(False)
    return model


def tie(draw, model):
    """Tie a few parameters: another module's parameter of the same shape takes the place of one."""
    slots = [(m, n, p) for _, m in model.named_modules() for n, p in m._parameters.items() if not is_lazy(p)]
    for _ in range(draw(st.integers(0, 2))):
        if len(slots) < 2:
            return
        owner, name, param = draw(st.sampled_from(slots))
        same_shape = [p for _, _, p in slots if p is not param and p.shape == param.shape]
        if same_shape:
            owner.register_parameter(name, draw(st.sampled_from(same_shape)))


def is_lazy(param):
    return param is None or isinstance(param, nn.parameter.UninitializedParameter)


def wrap_some(draw, model):
    """Replace a few submodules by wrappers: FSDP1-style segment, real checkpoint wrapper, `torch.compile`."""
    compiled = set()
    for _ in range(draw(st.integers(1, 3))):
        places = [(parent, name) for _, parent in model.named_modules() for name in parent._modules]
        parent, name = draw(st.sampled_from(places))
        module = parent._modules[name]
        wrapper = draw(st.sampled_from((FakeFSDP, checkpoint_wrapper, torch.compile)))
        if wrapper is torch.compile and not compilable(module, compiled):
            wrapper = FakeFSDP
        compiled.add(id(module))
        parent._modules[name] = wrapper(module)


def compilable(module, compiled):
    """Once per module, not around a compiled module, not lazy modules before their first forward."""
    inner = list(module.modules())
    return not any(id(m) in compiled or type(m).__name__ == "OptimizedModule" for m in inner) and not any(
        map(is_lazy, module.parameters())
    )


# ---------------------------------------------------------------- the properties


def described(decisions):
    return [(d.name, id(d.param), d.multiplier, d.reason) for d in decisions]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_param_groups_random_trees_match_the_reference(data):
    """Test on random trees: each trainable parameter in exactly one group, none frozen, the reference's group."""
    model = data.draw(module_trees())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    groups = param_groups(model)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two groups"
    assert set(in_groups) == trainable, "a trainable parameter is missing, or a frozen one is grouped"
    assert all(g["params"] for g in groups), "an empty group"
    expected = {"no_decay": trainable & reference_no_decay(model), "decay": trainable - reference_no_decay(model)}
    got = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert got == {name: ids for name, ids in expected.items() if ids}

    before = described(decide(model))
    wrap_some(data.draw, model)
    assert described(decide(model)) == before, "wrapping submodules changed the decisions"


# ---------------------------------------------------------------- real FSDP1 and FSDP2, two processes on CPU


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.rms = MyRMSNorm(8)
        self.act = nn.PReLU()

    def forward(self, x):
        return self.act(self.rms(self.norm(self.fc(x))))


FSDP_MODELS = {
    "layers": lambda: nn.Sequential(Layer(), Layer(), nn.Linear(8, 2)),
    "nested": lambda: nn.Sequential(nn.Sequential(Layer(), nn.BatchNorm1d(8)), nn.Linear(8, 2, bias=False)),
}


def described_by_name(decisions):
    return [(d.name, d.multiplier, d.reason) for d in decisions]


def fsdp_worker(rank, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for build in FSDP_MODELS.values():
            torch.manual_seed(0)
            expected = described_by_name(decide(build()))
            wrap_policy = ModuleWrapPolicy({Layer, nn.Linear})
            fsdp1 = FullyShardedDataParallel(
                build(), use_orig_params=True, auto_wrap_policy=wrap_policy, device_id=torch.device("cpu")
            )
            assert any("_fsdp_wrapped_module" in n for n, _ in fsdp1.named_parameters())
            fsdp2 = build()
            mesh = init_device_mesh("cpu", (2,))
            for module in fsdp2.modules():
                if isinstance(module, Layer):
                    fully_shard(module, mesh=mesh)
            fully_shard(fsdp2, mesh=mesh)
            for model in (fsdp1, fsdp2):
                assert described_by_name(decide(model)) == expected
                optimizer = torch.optim.AdamW(param_groups(model), lr=0.1, weight_decay=0.1)
            fsdp2(torch.randn(4, 8)).sum().backward()  # one step with sharded (DTensor) parameters in our groups
            optimizer.step()
            flat = FullyShardedDataParallel(build(), use_orig_params=False, device_id=torch.device("cpu"))
            with pytest.raises(ValueError, match=r"`_flat_param` is an FSDP flat parameter.*use_orig_params=True"):
                param_groups(flat)
    finally:
        dist.destroy_process_group()


def test_param_groups_same_under_real_fsdp1_and_fsdp2():
    """Test with two gloo processes that FSDP1 (use_orig_params) and FSDP2 give the unwrapped model's decisions."""
    mp.spawn(fsdp_worker, args=(free_port(),), nprocs=2, join=True)
