"""Which elements of a tensor this rank holds, for norms of sharded parameters. Pure PyTorch.

A DTensor (FSDP2 ``fully_shard``, tensor parallelism) holds its ``to_local()`` shard, possibly replicated over
some mesh dimensions; a DeepSpeed ZeRO-3 parameter its ``ds_tensor`` without the padding of the last
partition; an FSDP1 (``use_orig_params=True``) parameter a 1-D view of the local flat shard, over the process
group :func:`fsdp_shard_group` finds.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn


def fsdp_shard_group(module: nn.Module) -> Any:
    """The process group FSDP1 shards ``module``'s parameters over, or ``None`` when FSDP1 does not shard it.

    ``None`` also for ``NO_SHARD`` (every rank holds every parameter) and for FSDP2, whose DTensor parameters
    :func:`group_norms` recognises on its own. Pass the result on as
    ``group_norms(..., sharded=group is not None, process_group=group)``.

    Examples:
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


def local_part(tensor: Tensor, sharded: bool) -> tuple[Tensor, int]:
    """The elements of ``tensor`` this rank holds and how many ranks hold them (0: every rank)."""
    if _DTENSOR is not None and isinstance(tensor, _DTENSOR):
        return tensor.to_local(), _dtensor_replicas(tensor)  # type: ignore[attr-defined]
    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None:
        return _zero3_local(tensor, partition), 1
    return tensor, 1 if sharded else 0


def localize(tensor: Any) -> Tensor:
    """The elements this rank holds of a DTensor or a ZeRO-3 parameter (the tensors :func:`local_part` changes)."""
    if _DTENSOR is not None and isinstance(tensor, _DTENSOR):
        return tensor.to_local()  # type: ignore[attr-defined]
    return _zero3_local(tensor, tensor.ds_tensor)


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


_DTENSOR = _dtensor_class()
