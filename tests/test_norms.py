"""Tests of ``lightning_nodecay.norms``: per-group norms, precision, and sharded reduction on 2 gloo ranks."""

from __future__ import annotations

import functools
import json
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_nodecay import fsdp_shard_group
from lightning_nodecay.norms import (
    NormPlan,
    NormStats,
    PlanCache,
    _foreach_norm,
    _looped_norm,
    check_norm_type,
    group_norms,
    reduce_stats,
    roots,
)

NORM_TYPES = (1.0, 2.0, 3.5, "inf")


def oracle(groups: list[list[torch.Tensor]], norm_type: float | str) -> tuple[list[float], float]:
    """Norms of each group and of all groups, from one float64 vector per group."""
    p = math.inf if norm_type == "inf" else norm_type
    empty = torch.zeros(0, dtype=torch.float64)
    flat = [torch.cat([t.detach().double().flatten() for t in group] or [empty]) for group in groups]
    norms = [torch.linalg.vector_norm(f, p).item() if f.numel() else 0.0 for f in flat]
    return norms, torch.linalg.vector_norm(torch.cat(flat), p).item()


def mixed_groups(dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """Groups mixing every path: packed 1-D (over two scratch buffers) and 2-D tensors, large ones, 0-d, empty,
    non-contiguous."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))

    small_1d = [rand(16) for _ in range(300)]
    small_2d = [rand(16, 16) for _ in range(70)]
    return [
        [*small_1d, rand(()), rand(0)],
        [*small_2d, rand(300, 100), torch.randn(8, 4, generator=gen).to(dtype).t()],
        [rand(20000)],
        [],
    ]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_group_norms_match_concatenated_norm(norm_type):
    """Test that each group's norm and the total equal the norm of the concatenated tensors."""
    groups = mixed_groups()
    result = group_norms(groups, norm_type)
    expected, total = oracle(groups, norm_type)
    torch.testing.assert_close(result.norms.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert result.total.item() == pytest.approx(total, rel=1e-5)


def test_group_norms_count_elements():
    """Test that the element counts are the groups' numbers of elements, and absent for the infinity norm."""
    groups = mixed_groups()
    assert group_norms(groups).numels.tolist() == [sum(t.numel() for t in group) for group in groups]
    assert group_norms(groups, "inf").numels is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", [2.0, "inf"])
def test_group_norms_accumulate_half_in_float32(dtype, norm_type):
    """Test that half-precision tensors, small (packed) and large, are summed in float32, not in their dtype."""
    groups = [[torch.full((200_000,), 0.5, dtype=dtype)], [torch.full((64,), 0.25, dtype=dtype) for _ in range(3000)]]
    expected, total = oracle(groups, norm_type)
    result = group_norms(groups, norm_type)
    torch.testing.assert_close(result.norms.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert result.total.item() == pytest.approx(total, rel=1e-5)


def test_group_norms_keep_float64_precision():
    """Test that float64 tensors are reduced in float64 (float32 would round every element to 1)."""
    groups = [[torch.full((1000,), 1.0 + 1e-9, dtype=torch.float64)]]
    result = group_norms(groups, 1)
    assert result.norms.dtype == torch.float64
    assert result.norms.item() == pytest.approx(1000 * (1.0 + 1e-9), rel=1e-13)


def test_group_norms_of_no_groups_are_empty():
    """Test that no groups give no norms and a zero total, for every norm type."""
    for norm_type in NORM_TYPES:
        result = group_norms([], norm_type)
        assert result.norms.shape == (0,)
        assert result.total.item() == 0.0


@pytest.mark.parametrize("norm_type", [0, -1, "two", "Inf", True, float("nan"), None])
def test_check_norm_type_rejects_bad_values(norm_type):
    """Test that a bad `norm_type` raises an error naming the argument."""
    with pytest.raises(ValueError, match="`norm_type` must be a positive number or 'inf'"):
        group_norms([[torch.ones(2)]], norm_type)


@pytest.mark.parametrize(("norm_type", "expected"), [(2, 2.0), (0.5, 0.5), ("inf", math.inf), (math.inf, math.inf)])
def test_check_norm_type_accepts_positive_numbers_and_inf(norm_type, expected):
    """Test that positive numbers and 'inf' are accepted as floats."""
    assert check_norm_type(norm_type) == expected


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_looped_norm_fallback_matches_foreach(norm_type):
    """Test that the fallback for torches without `_foreach_norm(dtype=)` gives the same per-tensor norms."""
    tensors = [torch.randn(5, 3), torch.randn(7).to(torch.bfloat16)]
    torch.testing.assert_close(
        torch.stack(_looped_norm(tensors, norm_type, torch.float32)),
        torch.stack(_foreach_norm(tensors, norm_type, torch.float32)),
    )


def test_fsdp_shard_group_is_none_without_fsdp():
    """Test that an unwrapped module is not reported as sharded."""
    assert fsdp_shard_group(nn.Sequential(nn.Linear(2, 2))) is None


def update_oracle(before: list[list[torch.Tensor]], after: list[list[torch.Tensor]], norm_type) -> list[float]:
    """Norms of each group's change, from float64 copies of the tensors before and after."""
    changes = [
        [a.double() - b.double() for a, b in zip(ga, gb, strict=True)] for ga, gb in zip(after, before, strict=True)
    ]
    return oracle(changes, norm_type)[0]


def update_in_place(groups: list[list[torch.Tensor]], shift: float = 0.25) -> None:
    """A change that is not proportional to the tensors: halve them, then add ``shift``."""
    with torch.no_grad():
        for group in groups:
            for tensor in group:
                tensor.mul_(0.5).add_(shift)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_plan_gives_the_norms_of_the_current_values_at_every_use(norm_type):
    """Test that one plan, used again after the tensors changed in place, gives the norms of their new values, as a
    new `group_norms` call does."""
    groups = mixed_groups()
    plan = NormPlan(groups)
    p = check_norm_type(norm_type)
    for _ in range(2):
        result = plan.local(p).norms(p)
        expected, total = oracle(groups, norm_type)
        torch.testing.assert_close(result.norms, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
        assert result.total.item() == pytest.approx(total, rel=1e-5)
        update_in_place(groups)


@pytest.mark.parametrize(("dtype", "shift"), [(torch.float32, 0.25), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_plan_measures_the_change_since_its_snapshot(dtype, shift, norm_type):
    """Test that `local_with_update` gives the norms of the current values and of their change since the snapshot,
    over every path (packed 1-D and 2-D buffers, large tensors, 0-d, empty, non-contiguous), leaving the tensors'
    values alone and emptying the snapshot. The change is taken in the tensors' dtype, exact when every element keeps
    its sign and moves by less than its magnitude, as in an optimizer step: the bfloat16 case halves the tensors."""
    groups = mixed_groups(dtype)
    plan = NormPlan(groups)
    before = [[t.detach().clone() for t in group] for group in groups]
    snapshot = plan.snapshot()
    update_in_place(groups, shift)
    after = [[t.detach().clone() for t in group] for group in groups]
    p = check_norm_type(norm_type)
    weights, update = (stats.norms(p) for stats in plan.local_with_update(p, snapshot))
    assert all(not copies for copies in snapshot)  # consumed: the copies are gone
    assert all(torch.equal(a, t) for ga, g in zip(after, groups, strict=True) for a, t in zip(ga, g, strict=True))
    torch.testing.assert_close(
        weights.norms, torch.tensor(oracle(after, norm_type)[0], dtype=torch.float64), rtol=1e-5, atol=0
    )
    expected = torch.tensor(update_oracle(before, after, norm_type), dtype=torch.float64)
    torch.testing.assert_close(update.norms, expected, rtol=1e-5, atol=0)


def test_roots_match_the_tensor_form():
    """Test that the float form of the roots gives the norms `NormStats.norms` gives."""
    stats = NormStats(torch.tensor([9.0, 0.0, 16.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 2.0]))
    for p in (2.0, 3.0, math.inf):
        result = stats.norms(p)
        norms, total = roots(stats.stats.tolist(), p)
        assert norms == pytest.approx(result.norms.tolist(), rel=1e-12)
        assert total == pytest.approx(result.total.item(), rel=1e-12)
    assert roots([], 2.0) == ([], 0.0)
    assert roots([], math.inf) == ([], 0.0)


def test_reduce_stats_without_sharding_returns_the_parts():
    """Test that nothing sharded means no collective: the parts come back as they are (no process group needed)."""
    parts = [NormPlan([[torch.ones(3)]]).local(2.0), NormPlan([[torch.ones(2)], []]).local(2.0)]
    assert reduce_stats(parts, 2.0, reduce=False) == parts


def test_plan_cache_keeps_a_plan_while_the_groups_hold_the_same_tensors():
    """Test that the cache gives back the same plan for the same tensors in new lists, and a new one when a group
    holds another tensor, a tensor more, or a tensor with new storage."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    weight, bias, norm_weight, norm_bias = model.parameters()
    cache = PlanCache()
    plan = cache.plan(0, [[weight], [bias, norm_weight]])
    assert cache.plan(0, [[weight], [bias, norm_weight]]) is plan
    assert cache.plan(1, [[weight], [bias, norm_weight]]) is not plan  # another slot
    assert cache.plan(0, [[weight], [bias, norm_bias]]) is not plan  # another tensor
    plan = cache.plan(0, [[weight], [bias, norm_bias]])
    assert cache.plan(0, [[weight], [bias, norm_bias, norm_weight]]) is not plan  # a tensor more
    plan = cache.plan(0, [[weight], [bias]])
    assert cache.plan(0, [[weight, bias]]) is not plan  # the same tensors, grouped otherwise
    plan = cache.plan(0, [[weight], [bias]])
    with torch.no_grad():
        weight.data = weight.data.clone()  # new storage, the same object
    assert cache.plan(0, [[weight], [bias]]) is not plan
    cache.clear()
    assert not cache._entries


def test_plan_cache_follows_a_module_conversion():
    """Test that converting the module (which keeps its parameter objects) gives a new plan, whose norms are those
    of the converted values, accumulated in float64."""
    model = nn.Linear(4, 3)
    groups = [[model.weight], [model.bias]]
    cache = PlanCache()
    plan = cache.plan(0, groups)
    model.double()
    assert model.weight is groups[0][0]
    converted = cache.plan(0, groups)
    assert converted is not plan
    result = converted.local(2.0).norms(2.0)
    assert result.norms.tolist() == pytest.approx(oracle(groups, 2.0)[0], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Two gloo ranks. One spawn runs every scenario; each rank writes what it computed and the oracle, the tests below
# assert on those files. A scenario returns (groups, sharded, process_group, oracle_groups_fn, step_fn), where the
# step changes the tensors as training does (a real SGD step through the wrapped model where there is one).


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _by_name(model: nn.Module) -> list[list[nn.Parameter]]:
    """Weights of the linear layers, and everything else (FSDP1 has already flattened the shapes)."""
    named = list(model.named_parameters())
    weights = [p for name, p in named if name.endswith(("0.weight", "2.weight"))]
    return [weights, [p for _, p in named if not any(p is w for w in weights)]]


def _train_one_step(model: nn.Module, groups: list[list[nn.Parameter]]) -> None:
    optimizer = torch.optim.SGD([{"params": group} for group in groups], lr=0.1)
    model(torch.randn(2, 4, generator=torch.Generator().manual_seed(dist.get_rank()))).pow(2).sum().backward()
    optimizer.step()


def _fsdp1(sharding: str):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `NO_SHARD` sharding strategy is deprecated", FutureWarning)
        model = FullyShardedDataParallel(
            _model(), use_orig_params=True, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy[sharding]
        )
    groups = _by_name(model)
    _train_one_step(model, groups)
    shard_group = fsdp_shard_group(model)

    def full() -> list[list[torch.Tensor]]:
        with FullyShardedDataParallel.summon_full_params(model):
            return [[p.detach().clone() for p in group] for group in groups]

    return groups, shard_group is not None, shard_group, full, lambda: _train_one_step(model, groups)


def _fsdp2(mesh_shape: tuple[int, ...]):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    names = ("replicate", "shard")[-len(mesh_shape) :]
    fully_shard(model, mesh=init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
    groups = _by_name(model)
    _train_one_step(model, groups)
    step = functools.partial(_train_one_step, model, list(groups))
    # a plain tensor every rank holds in full, next to the sharded ones: counted once
    replicated = torch.arange(5.0)
    groups.append([replicated])
    return (
        groups,
        False,
        None,
        lambda: [[p.full_tensor() for p in group] for group in groups[:2]] + [[replicated]],
        step,
    )


def _zero3():
    """ZeRO-3 stand-ins: empty `data`, `ds_tensor` holding this rank's partition, the last one padded with junk."""
    full = [torch.randn(7, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = []
    for tensor in full:
        size = math.ceil(tensor.numel() / 2)
        start = dist.get_rank() * size
        local = tensor.flatten()[start : start + size]
        param = nn.Parameter(torch.empty(0))
        param.ds_tensor = torch.cat([local, torch.full((size - local.numel(),), 1e6)])
        param.ds_numel = tensor.numel()
        param.ds_process_group = dist.group.WORLD
        params.append(param)

    def step() -> None:
        for tensor in [*full, *(param.ds_tensor for param in params)]:
            tensor.mul_(0.5).add_(0.25)

    return [params[:2], params[2:]], False, None, lambda: [full[:2], full[2:]], step


def _replicated():
    """DDP: every rank holds every parameter in full, nothing is reduced."""
    model = _model()
    groups = _by_name(model)
    return groups, False, None, lambda: groups, lambda: _train_one_step(model, groups)


SCENARIOS = {
    "fsdp1": lambda: _fsdp1("FULL_SHARD"),
    "fsdp1_no_shard": lambda: _fsdp1("NO_SHARD"),
    "fsdp2": lambda: _fsdp2((2,)),
    "fsdp2_hybrid": lambda: _fsdp2((2, 1)),
    "zero3": _zero3,
    "replicated": _replicated,
}


def _counted(function, *args, **kwargs):
    """``function(*args, **kwargs)`` and the number of `all_reduce` calls it issued (the real collective runs)."""
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    dist.all_reduce = counting_all_reduce
    try:
        return function(*args, **kwargs), len(calls)
    finally:
        dist.all_reduce = original


def _updates(groups, sharded, process_group, full, step) -> dict:
    """Per norm type, the weights' and the update's norms over one step from one kept plan (and the oracles), the
    collectives of their joint reduction; and whether a plan cache keeps the plan through the steps."""
    cache = PlanCache(sharded=sharded, process_group=process_group)
    plan = cache.plan(0, groups)
    results = {}
    for norm_type in NORM_TYPES:
        p = check_norm_type(norm_type)
        before = [[t.detach().clone() for t in group] for group in full()]
        snapshot = plan.snapshot()
        step()
        local = list(plan.local_with_update(p, snapshot))
        (weights, update), calls = _counted(reduce_stats, local, p, reduce=plan.reduce, process_group=process_group)
        after = full()
        results[str(norm_type)] = {
            "weights": weights.norms(p).norms.tolist(),
            "update": update.norms(p).norms.tolist(),
            "expected_weights": oracle(after, norm_type)[0],
            "expected_update": update_oracle(before, after, norm_type),
            "calls": calls,
        }
    results["plan_kept"] = cache.plan(0, groups) is plan
    return results


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for name, scenario in SCENARIOS.items():
        groups, sharded, process_group, full, step = scenario()
        results[name] = {"local_numels": [t.numel() for g in groups for t in g]}
        for norm_type in NORM_TYPES:
            result, calls = _counted(group_norms, groups, norm_type, sharded=sharded, process_group=process_group)
            expected, total = oracle(full(), norm_type)
            results[name][str(norm_type)] = {
                "norms": result.norms.tolist(),
                "total": result.total.item(),
                "numels": None if result.numels is None else result.numels.tolist(),
                "expected": expected,
                "expected_total": total,
                "expected_numels": [sum(t.numel() for t in g) for g in full()],
                "calls": calls,
            }
        results[name]["updates"] = _updates(groups, sharded, process_group, full, step)
    with open(f"{out_dir}/rank{rank}.json", "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_group_norms_sharded_equal_unsharded(distributed_results, scenario, norm_type):
    """Test that on 2 ranks every rank gets the norms of the full tensors, from its local parts."""
    for rank_results in distributed_results:
        got = rank_results[scenario][str(norm_type)]
        assert got["norms"] == pytest.approx(got["expected"], rel=1e-5)
        assert got["total"] == pytest.approx(got["expected_total"], rel=1e-5)
        if norm_type != "inf":
            assert got["numels"] == got["expected_numels"]


@pytest.mark.parametrize(
    ("scenario", "collectives"),
    [("fsdp1", 1), ("fsdp1_no_shard", 0), ("fsdp2", 1), ("fsdp2_hybrid", 1), ("zero3", 1), ("replicated", 0)],
)
def test_group_norms_issue_one_collective_when_sharded(distributed_results, scenario, collectives):
    """Test that a call issues exactly one all_reduce for all groups when sharded, and none when replicated."""
    for rank_results in distributed_results:
        assert {rank_results[scenario][str(p)]["calls"] for p in NORM_TYPES} == {collectives}


def test_group_norms_fsdp1_shards_include_empty_views(distributed_results):
    """Test that the FSDP1 scenario really exercises empty local views (and that ranks split the elements)."""
    rank0, rank1 = (r["fsdp1"]["local_numels"] for r in distributed_results)
    assert 0 in rank0 + rank1
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == [32, 24, 8, 8, 8, 3]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_plan_measures_sharded_updates(distributed_results, scenario, norm_type):
    """Test that on 2 ranks a kept plan gives the norms of the full weights and of their change over a real step
    (FSDP1's views swapped by its forward and backward, FSDP2's DTensors), from one collective for both."""
    expected_calls = 0 if scenario in ("fsdp1_no_shard", "replicated") else 1
    for rank_results in distributed_results:
        got = rank_results[scenario]["updates"][str(norm_type)]
        assert got["weights"] == pytest.approx(got["expected_weights"], rel=1e-5)
        assert got["update"] == pytest.approx(got["expected_update"], rel=1e-5)
        assert any(got["update"])
        assert got["calls"] == expected_calls


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_plan_cache_keeps_the_plan_through_sharded_steps(distributed_results, scenario):
    """Test that sharded training steps keep the tensors' objects and storage, so that a kept plan is reused."""
    assert all(rank_results[scenario]["updates"]["plan_kept"] for rank_results in distributed_results)
