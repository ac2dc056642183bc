"""Per-group norms of tensors, fast, on one device or sharded across ranks.

Pure PyTorch: no Lightning import. :func:`group_norms` takes groups of tensors (the parameters of an
optimizer's param groups, or their gradients) and returns the p-norm of each group, and of all groups
together, as if each group's tensors were flattened into one vector.

How it is computed:

- Multi-tensor ops under ``no_grad``: one ``torch._foreach_norm`` call per group, device and dtype (a
  fused kernel on GPUs), accumulating in float32 (float64 for float64 tensors), so half and bfloat16
  tensors lose nothing to their own precision. Parameters are not copied; the one exception is CPU, where
  PyTorch has no fused foreach kernel (``_foreach_norm`` runs one reduction per tensor, no faster than a
  Python loop): there, tensors under 16K elements are packed with ``torch.cat`` (one per shape) into
  scratch buffers of at most 4M elements and reduced together. Per-tensor norms are combined in float64.
- Sharded tensors contribute the part this rank holds: a DTensor (FSDP2 ``fully_shard``, tensor
  parallelism) its ``to_local()`` shard, a DeepSpeed ZeRO-3 parameter its ``ds_tensor`` (without the
  padding of the last partition), and a plain tensor its local elements when ``sharded=True`` (FSDP1
  ``use_orig_params=True``: 1-D views of the local flat shard, some empty). The per-group sums of p-th
  powers (maxima for ``inf``) of all groups then go through ONE ``all_reduce`` over ``process_group``,
  and the root is taken after it. Elements that several ranks hold (replicated DTensor dimensions, plain
  tensors next to sharded ones) are counted once. Nothing sharded (one device, DDP): no collective.

Every rank of ``process_group`` must call :func:`group_norms` with the same groups at the same time when
a collective is involved, as with any collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: On CPU, tensors with fewer elements than this are packed into scratch buffers before the reduction.
_PACK_BELOW = 1 << 14
#: Tensors per scratch buffer: at most 4M elements (16 MB of float32).
_PACK_COUNT = (1 << 22) // _PACK_BELOW


class GroupNorms(NamedTuple):
    """The norms :func:`group_norms` returns.

    Attributes:
        norms: float64 tensor of shape ``(len(groups),)``, the norm of each group (0 for an empty group).
        total: float64 scalar tensor, the norm of all groups' tensors together.
        numels: int64 tensor of shape ``(len(groups),)``, the number of elements of each group across all
            ranks, or ``None`` for the infinity norm (its max-reduction cannot count elements).

    Example:
        >>> result = group_norms([[torch.tensor([3.0, 4.0])], []])
        >>> result.norms.tolist(), result.total.item(), result.numels.tolist()
        ([5.0, 0.0], 5.0, [2, 0])
    """

    norms: Tensor
    total: Tensor
    numels: Tensor | None


def check_norm_type(norm_type: float | str) -> float:
    """``norm_type`` as a float (``math.inf`` for ``"inf"``), or a clear error when it is not a positive number.

    Example:
        >>> check_norm_type(2), check_norm_type("inf")
        (2.0, inf)
    """
    if norm_type == "inf":
        return math.inf
    if isinstance(norm_type, (int, float)) and not isinstance(norm_type, bool) and norm_type > 0:
        return float(norm_type)
    raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {norm_type!r}.")


def group_norms(
    groups: Sequence[Iterable[Tensor]],
    norm_type: float | str = 2.0,
    *,
    sharded: bool = False,
    process_group: Any = None,
) -> GroupNorms:
    """The ``norm_type``-norm of every group of tensors, and of all of them together.

    Args:
        groups: one iterable of tensors per group, e.g. ``[g["params"] for g in optimizer.param_groups]``.
        norm_type: any positive float, or ``"inf"`` for the largest absolute value.
        sharded: the plain tensors are this rank's shards of tensors spread over ``process_group`` (FSDP1;
            see :func:`fsdp_shard_group`). DTensors and ZeRO-3 parameters are recognised without it.
        process_group: the group to reduce over when anything is sharded (default: the default group).

    Returns:
        The per-group norms, the total norm and the per-group element counts, see :class:`GroupNorms`.

    Example:
        >>> result = group_norms([[torch.full((2, 2), 3.0)], [torch.tensor([3.0]), torch.tensor([4.0])]])
        >>> result.norms.tolist(), round(result.total.item(), 4), result.numels.tolist()
        ([6.0, 5.0], 7.8102, [4, 2])
    """
    p = check_norm_type(norm_type)
    with torch.no_grad():
        parts = [_GroupParts(group, sharded) for group in groups]
        device = next((part.device for part in parts if part.device is not None), torch.device("cpu"))
        reduce = sharded or any(part.sharded for part in parts)
        world = dist.get_world_size(process_group) if reduce else 1
        stats = _local_stats(parts, p, world, device)
        numels = torch.tensor([part.numel(world) for part in parts], dtype=torch.float64, device=device)
        if reduce:
            stats, numels = _all_reduce(stats, numels, p, process_group)
        if p == math.inf:
            return GroupNorms(stats, stats.max() if len(stats) else stats.new_zeros(()), None)
        return GroupNorms(stats.pow(1 / p), stats.sum().pow(1 / p), numels.round().long())


def fsdp_shard_group(module: nn.Module) -> Any:
    """The process group FSDP1 shards ``module``'s parameters over, or ``None`` when FSDP1 does not shard it.

    ``None`` also for ``NO_SHARD`` (every rank holds every parameter) and for FSDP2, whose DTensor parameters
    :func:`group_norms` recognises on its own. Pass the result on as
    ``group_norms(..., sharded=group is not None, process_group=group)``.

    Example:
        >>> fsdp_shard_group(nn.Linear(2, 2)) is None
        True
    """
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    for unit in FullyShardedDataParallel.fsdp_modules(module):
        if unit.sharding_strategy != ShardingStrategy.NO_SHARD:
            return unit.process_group
    return None


class _GroupParts:
    """The non-empty local parts of one group's tensors, in buckets reduced together.

    A bucket holds tensors of one device, replica count and dtype; on CPU, small tensors are further
    bucketed by shape (all 1-D ones together), so that a bucket can be packed with ``torch.cat``.
    ``replicas`` is how many ranks of the reduction group hold the same elements: 1 for a unique shard,
    ``k`` for a DTensor shard replicated over mesh dimensions of total size ``k``, 0 for "every rank" (a full
    tensor). When reduced, a part counts ``1 / replicas`` (``1 / world`` for 0) so that its copies add up to one.
    """

    def __init__(self, tensors: Iterable[Tensor], sharded: bool) -> None:
        self.buckets: dict[tuple[torch.device, int, torch.dtype, object], list[Tensor]] = {}
        self.device: torch.device | None = None
        self.sharded = sharded
        plain = 1 if sharded else 0
        for tensor in tensors:  # the hot loop of the many-small-tensors case: keep it lean
            if type(tensor) in _PLAIN_TYPES and getattr(tensor, "ds_tensor", None) is None:
                local, replicas = tensor, plain
            else:
                local, replicas = _local_part(tensor, sharded)
                self.sharded |= replicas > 0
            cpu = local.is_cpu
            device = _CPU if cpu else local.device
            if self.device is None:
                self.device = device
            numel = local.numel()
            if numel:
                # CPU has no fused foreach kernel: small tensors are packed with `torch.cat`, with the tensors of
                # their shape (1-D ones all together)
                pack = None
                if cpu and numel < _PACK_BELOW:
                    dim = local.dim()
                    pack = "1-D" if dim == 1 else local.shape if dim else None
                self.buckets.setdefault((device, replicas, local.dtype, pack), []).append(local)

    def numel(self, world: int) -> float:
        """The group's element count, each local element counted ``1 / replicas`` (``1 / world`` for 0)."""
        return sum(sum(map(Tensor.numel, tensors)) / (key[1] or world) for key, tensors in self.buckets.items())


def _local_stats(parts: list[_GroupParts], p: float, world: int, device: torch.device) -> Tensor:
    """Per-group sums of p-th powers (maxima for ``inf``) of the local elements, float64 on ``device``.

    All buckets' piece norms are combined in a handful of ops, whatever the number of groups and buckets.
    """
    pieces, owners, shares = [], [], []
    for index, part in enumerate(parts):
        for (_, replicas, dtype, pack), tensors in part.buckets.items():
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            norms = _bucket_norms(tensors, p, wide, packed=pack is not None)
            pieces.append(norms.to(device, torch.float64))
            owners += [index] * len(norms)
            shares += [1 / (replicas or world)] * len(norms)
    stats = torch.zeros(len(parts), dtype=torch.float64, device=device)
    if not pieces:
        return stats
    norms, owner = torch.cat(pieces), torch.tensor(owners, device=device)
    if p == math.inf:
        return stats.scatter_reduce_(0, owner, norms, "amax")
    return stats.index_add_(0, owner, norms.pow(p) * torch.tensor(shares, dtype=torch.float64, device=device))


def _bucket_norms(tensors: list[Tensor], p: float, wide: torch.dtype, packed: bool) -> Tensor:
    """Norms of pieces that together hold exactly the elements of ``tensors``, accumulated in ``wide``."""
    if not packed or len(tensors) == 1:
        return torch.stack(_FOREACH_NORM(tensors, p, wide))
    return torch.stack(
        [
            torch.linalg.vector_norm(torch.cat(tensors[i : i + _PACK_COUNT]), p, dtype=wide)
            for i in range(0, len(tensors), _PACK_COUNT)
        ]
    )


def _local_part(tensor: Tensor, sharded: bool) -> tuple[Tensor, int]:
    """The elements of ``tensor`` this rank holds and how many ranks hold them (0: every rank)."""
    if _DTENSOR is not None and isinstance(tensor, _DTENSOR):
        return tensor.to_local(), _dtensor_replicas(tensor)  # type: ignore[attr-defined]
    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None:
        return _zero3_local(tensor, partition), 1
    return tensor, 1 if sharded else 0


def _dtensor_replicas(tensor: Any) -> int:
    """How many ranks of the DTensor's mesh hold its local shard (0 when it is fully replicated)."""
    replicas, has_shard = 1, False
    for dim, placement in enumerate(tensor.placements):
        if placement.is_partial():
            raise ValueError(
                "`group_norms` got a DTensor with a `Partial` placement (a pending reduction), whose local"
                " values are not its elements. Reduce it first, e.g. `tensor.redistribute(placements=...)`."
            )
        if placement.is_shard():
            has_shard = True
        else:
            replicas *= tensor.device_mesh.size(dim)
    return replicas if has_shard else 0


def _zero3_local(param: Any, partition: Tensor) -> Tensor:
    """The elements of a DeepSpeed ZeRO-3 ``param`` this rank holds: its ``ds_tensor`` without padding.

    ZeRO-3 splits the flattened parameter into equal partitions of its process group; the last ones are
    padded past ``param.ds_numel`` with uninitialised memory, which must not enter the norm.
    """
    rank = dist.get_rank(getattr(param, "ds_process_group", None))
    size = partition.numel()
    return partition.reshape(-1).narrow(0, 0, min(size, max(0, param.ds_numel - rank * size)))


def _all_reduce(stats: Tensor, numels: Tensor, p: float, process_group: Any) -> tuple[Tensor, Tensor]:
    """Reduce the per-group statistics (and element counts, for finite ``p``) in ONE collective."""
    if p == math.inf:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=process_group)
        return stats, numels
    buffer = torch.cat([stats, numels])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
    return buffer[: len(stats)], buffer[len(stats) :]


def _foreach_norm(tensors: list[Tensor], p: float, wide: torch.dtype) -> list[Tensor]:
    return list(torch._foreach_norm(tensors, p, dtype=wide))


def _looped_norm(tensors: list[Tensor], p: float, wide: torch.dtype) -> list[Tensor]:
    """The fallback where ``torch._foreach_norm`` (with its ``dtype`` argument) is missing."""
    return [torch.linalg.vector_norm(tensor, p, dtype=wide) for tensor in tensors]


def _pick_foreach_norm() -> Callable[[list[Tensor], float, torch.dtype], list[Tensor]]:
    try:
        _foreach_norm([torch.ones(1)], 2.0, torch.float32)
    except (AttributeError, TypeError, RuntimeError):
        return _looped_norm
    return _foreach_norm


def _dtensor_class() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_PLAIN_TYPES = (Tensor, nn.Parameter)
_CPU = torch.device("cpu")
_FOREACH_NORM = _pick_foreach_norm()
_DTENSOR = _dtensor_class()
