"""Per-group norms of tensors, fast, on one device or sharded across ranks.

Pure PyTorch: no Lightning import. :func:`group_norms` takes groups of tensors (the parameters of an
optimizer's param groups, or their gradients) and returns the p-norm of each group, and of all groups
together, as if each group's tensors were flattened into one vector.

How it is computed:

- Multi-tensor ops under ``no_grad``: one ``torch._foreach_norm`` call per device and dtype (a fused kernel
  on GPUs), accumulating in float32 (float64 for float64 tensors), so half and bfloat16 tensors lose
  nothing to their own precision. Parameters are not copied; the one exception is CPU, where PyTorch has
  no fused foreach kernel (``_foreach_norm`` runs one reduction per tensor, no faster than a Python loop):
  there, tensors under 16K elements are packed with ``torch.cat`` (one per shape) into scratch buffers of
  at most 4M elements and reduced together. Per-tensor norms are combined in float64.
- Sharded tensors contribute the part this rank holds: a DTensor (FSDP2 ``fully_shard``, tensor
  parallelism) its ``to_local()`` shard, a DeepSpeed ZeRO-3 parameter its ``ds_tensor`` (without the
  padding of the last partition), and a plain tensor its local elements when ``sharded=True`` (FSDP1
  ``use_orig_params=True``: 1-D views of the local flat shard, some empty). The per-group sums of p-th
  powers (maxima for ``inf``) of all groups then go through ONE ``all_reduce`` over ``process_group``,
  and the root is taken after it. Elements that several ranks hold (replicated DTensor dimensions, plain
  tensors next to sharded ones) are counted once. Nothing sharded (one device, DDP): no collective.

The layout (which tensor goes in which bucket and buffer, and the index tensors that combine the pieces) is
a :class:`NormPlan`. :func:`group_norms` builds one per call. A caller that computes the norms of the same
groups again and again (``WeightNormMonitor``) keeps its plans in a :class:`PlanCache` while the groups keep
their tensors, reduces several sets of statistics (weights, updates, gradients) in one collective with
:func:`reduce_stats`, and measures an optimizer step with :meth:`NormPlan.snapshot`.

Every rank of ``process_group`` must call :func:`group_norms` (or :func:`reduce_stats`) with the same groups
at the same time when a collective is involved, as with any collective.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_nodecay._shards import local_part, localize

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

    Examples:
        >>> result = group_norms([[torch.tensor([3.0, 4.0])], []])
        >>> result.norms.tolist(), result.total.item(), result.numels.tolist()
        ([5.0, 0.0], 5.0, [2, 0])
    """

    norms: Tensor
    total: Tensor
    numels: Tensor | None


def check_norm_type(norm_type: float | str) -> float:
    """``norm_type`` as a float (``math.inf`` for ``"inf"``), or a clear error when it is not a positive number.

    Examples:
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

    Examples:
        >>> result = group_norms([[torch.full((2, 2), 3.0)], [torch.tensor([3.0]), torch.tensor([4.0])]])
        >>> result.norms.tolist(), round(result.total.item(), 4), result.numels.tolist()
        ([6.0, 5.0], 7.8102, [4, 2])
    """
    p = check_norm_type(norm_type)
    plan = NormPlan(groups, sharded=sharded, process_group=process_group)
    (stats,) = reduce_stats([plan.local(p)], p, reduce=plan.reduce, process_group=process_group)
    return stats.norms(p)


class NormStats(NamedTuple):
    """Per-group statistics that norms are the roots of: this rank's part, or every rank's after :func:`reduce_stats`.

    Attributes:
        stats: float64 tensor of shape ``(groups,)``: sums of p-th powers, or maxima for the infinity norm.
        numels: float64 tensor of shape ``(groups,)``: element counts, each element counted by its share (an
            element that ``k`` ranks hold counts ``1 / k`` on each).
    """

    stats: Tensor
    numels: Tensor

    def norms(self, p: float) -> GroupNorms:
        """The norms of reduced statistics: per group, and of all groups together."""
        if p == math.inf:
            return GroupNorms(self.stats, self.stats.max() if len(self.stats) else self.stats.new_zeros(()), None)
        return GroupNorms(self.stats.pow(1 / p), self.stats.sum().pow(1 / p), self.numels.round().long())

    @staticmethod
    def join(parts: Sequence[NormStats]) -> NormStats:
        """The statistics of several sets of groups, one after the other, as one set."""
        if len(parts) == 1:
            return parts[0]
        return NormStats(torch.cat([part.stats for part in parts]), torch.cat([part.numels for part in parts]))


def roots(stats: Sequence[float], p: float) -> tuple[list[float], float]:
    """The norms of reduced statistics brought to the host, per group and of all groups together.

    The float form of :meth:`NormStats.norms`, for a caller that fetches all its statistics in one device sync.

    Examples:
        >>> roots([9.0, 16.0], 2.0)
        ([3.0, 4.0], 5.0)
    """
    if p == math.inf:
        return list(stats), max(stats, default=0.0)
    return [stat ** (1 / p) for stat in stats], sum(stats) ** (1 / p)


def reduce_stats(parts: Sequence[NormStats], p: float, *, reduce: bool, process_group: Any = None) -> list[NormStats]:
    """Every rank's statistics from this rank's, for several sets of groups in ONE collective.

    Args:
        parts: this rank's statistics (:meth:`NormPlan.local`), the same sets in the same order on every rank.
        p: the norm type they were computed for (the collective sums, or takes the maximum for ``inf``).
        reduce: whether anything is sharded (:attr:`NormPlan.reduce`); without it, ``parts`` are returned as is.
        process_group: the group to reduce over (default: the default group).

    Returns:
        The reduced statistics, one per part. Element counts are not reduced for the infinity norm.
    """
    if not reduce:
        return list(parts)
    sizes = [len(part.stats) for part in parts]
    joined = NormStats.join(parts)
    stats, numels = _all_reduce(joined.stats, joined.numels, p, process_group)
    return [NormStats(*pair) for pair in zip(stats.split(sizes), numels.split(sizes), strict=True)]


class NormPlan:
    """How the norms of fixed groups of tensors are computed: built once, reused while the groups keep their tensors.

    Building the plan is the costly part with many small tensors: one Python pass over every tensor to find its
    local part, replica count and bucket (see the module docstring). The plan keeps the buckets, the layout of
    the packed buffers and the index tensors that combine the pieces, so each use is a handful of ops. It reads the
    tensors' current values each time, and stays valid while every group holds the same tensor objects over the
    same storage (:class:`PlanCache` keeps plans on those terms).

    It also measures updates: :meth:`snapshot` copies the local elements, and :meth:`local_with_update` gives the
    statistics of the tensors and of their change since the snapshot, whose local parts reduce as the tensors'.

    Args:
        groups: one iterable of tensors per group.
        sharded: the plain tensors are this rank's shards (FSDP1), as for :func:`group_norms`.
        process_group: the group the statistics are reduced over when anything is sharded.

    Attributes:
        size: the number of groups.
        reduce: whether anything is sharded, so that :func:`reduce_stats` must run a collective.

    Examples:
        >>> weights = [torch.tensor([3.0, 4.0])]
        >>> plan = NormPlan([weights])
        >>> before = plan.snapshot()
        >>> weights[0].mul_(2)
        tensor([6., 8.])
        >>> now, update = plan.local_with_update(2.0, before)
        >>> now.norms(2.0).norms.tolist(), update.norms(2.0).norms.tolist()
        ([10.0], [5.0])
    """

    @torch.no_grad()
    def __init__(self, groups: Sequence[Iterable[Tensor]], *, sharded: bool = False, process_group: Any = None) -> None:
        parts = [_GroupParts(group, sharded) for group in groups]
        self.size = len(parts)
        self.reduce = sharded or any(part.sharded for part in parts)
        world = dist.get_world_size(process_group) if self.reduce else 1
        self._device = next((part.device for part in parts if part.device is not None), _CPU)
        self._streams = _streams(parts, world)
        self._numels = torch.tensor([part.numel(world) for part in parts], dtype=torch.float64, device=self._device)
        self._combinations: dict[int, tuple[Tensor, Tensor | None]] = {}

    @torch.no_grad()
    def local(self, p: float) -> NormStats:
        """This rank's statistics of the groups' current values, for the p-norm."""
        return NormStats(self._stats(p, [self._values()]), self._numels)

    @torch.no_grad()
    def snapshot(self) -> list[list[Tensor]]:
        """A copy of the local elements, for :meth:`local_with_update`."""
        return [[copy for bucket in stream.buckets for copy in bucket.copies()] for stream in self._streams]

    @torch.no_grad()
    def local_with_update(self, p: float, snapshot: list[list[Tensor]]) -> tuple[NormStats, NormStats]:
        """This rank's statistics of the current values and of their change since ``snapshot``, which it empties.

        The change is computed per local element (a sharded tensor's shard minus its snapshot) and reduces across
        ranks like the tensors themselves. It is taken in the tensors' dtype, which is exact for an element that
        keeps its sign and moves by less than its magnitude (Sterbenz), as optimizer steps move weights.
        """
        values = self._values()
        for before, after in zip(snapshot, values, strict=True):
            torch._foreach_sub_(before, after)  # minus the change: the same norms, and no new buffer
        stats = self._stats(p, [values, snapshot])
        for copies in snapshot:
            copies.clear()  # consumed: the copies are freed now, whoever still holds the snapshot
        return NormStats(stats[: self.size], self._numels), NormStats(stats[self.size :], self._numels)

    @torch.no_grad()
    def local_distance(self, p: float, reference: NormPlan) -> NormStats:
        """This rank's statistics of the tensors minus those of ``reference``, a plan of tensors in the same layout.

        ``reference`` holds one tensor per tensor of this plan, in the same order, with the same shape, dtype,
        device and sharding (the references of decay toward a reference are such tensors), so that the two
        plans' local elements line up.
        """
        offsets = reference.snapshot()
        for minus, values in zip(offsets, self._values(), strict=True):
            torch._foreach_sub_(minus, values)  # minus the offset: the same norms, and no new buffer
        return NormStats(self._stats(p, [offsets]), self._numels)

    def _values(self) -> list[list[Tensor]]:
        """Per stream, tensors that together hold exactly its local elements: packed buffers or the tensors."""
        return [[value for bucket in stream.buckets for value in bucket.values()] for stream in self._streams]

    def _stats(self, p: float, sets: list[list[list[Tensor]]]) -> Tensor:
        """Per-group sums of p-th powers (maxima for ``inf``) of sets of values, one set after the other, float64.

        Each set is laid out as :meth:`_values`; all sets go through one multi-tensor call per stream.
        """
        owner, share = self._combination(len(sets))
        stats = torch.zeros(len(sets) * self.size, dtype=torch.float64, device=self._device)
        pieces = [
            torch.stack(_FOREACH_NORM([t for values in sets for t in values[i]], p, stream.wide)).to(
                self._device, torch.float64
            )
            for i, stream in enumerate(self._streams)
        ]
        if not pieces:
            return stats
        norms = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if p == math.inf:
            return stats.scatter_reduce_(0, owner, norms, "amax")
        return stats.index_add_(0, owner, norms.pow(p) if share is None else norms.pow(p) * share)

    def _combination(self, count: int) -> tuple[Tensor, Tensor | None]:
        """Where each piece of ``count`` sets of values adds, and the weight of its p-th power (``None``: all 1).

        Pieces come stream by stream, then set by set within a stream; set ``k``'s statistics are rows
        ``k * size`` to ``(k + 1) * size``.
        """
        if count not in self._combinations:
            rows = [o + k * self.size for stream in self._streams for k in range(count) for o in stream.owners]
            shares = [share for stream in self._streams for _ in range(count) for share in stream.shares]
            share = None if set(shares) <= {1} else torch.tensor(shares, dtype=torch.float64, device=self._device)
            self._combinations[count] = (torch.tensor(rows, dtype=torch.long, device=self._device), share)
        return self._combinations[count]


class PlanCache:
    """Norm plans kept between uses, one per slot (e.g. per optimizer), each rebuilt when its groups change.

    A group changes when it holds another tensor object (or a tensor more or less), or when one of its tensors has
    new storage: ``module.to()`` keeps the parameter objects and assigns their ``data``, which would leave the
    plan's dtype, device and shape stale. In-place updates keep the storage, and so do FSDP1's views of its flat
    shard from one step to the next. Checking reads every tensor's data pointer (about 0.1 microsecond per tensor;
    during training it mostly brings into cache the tensors the plan reads next). The cache holds the tensors, so
    that the ids it compares stay theirs: :meth:`clear` it when done.

    Args:
        sharded: the plain tensors are this rank's shards (FSDP1), as for :func:`group_norms`.
        process_group: the group the plans' statistics are reduced over when anything is sharded.

    Examples:
        >>> weights = [torch.ones(2)]
        >>> cache = PlanCache()
        >>> plan = cache.plan(0, [weights])
        >>> cache.plan(0, [weights]) is plan, cache.plan(0, [[weights[0].clone()]]) is plan
        (True, False)
    """

    def __init__(self, *, sharded: bool = False, process_group: Any = None) -> None:
        self._sharded, self._process_group = sharded, process_group
        self._entries: dict[int, tuple[list[list[Tensor]], tuple[int, ...], NormPlan]] = {}

    @property
    def reduce(self) -> bool:
        """Whether a plan in the cache has sharded tensors, so that :func:`reduce_stats` must run a collective."""
        return self._sharded or any(plan.reduce for _, _, plan in self._entries.values())

    def plan(self, slot: int, groups: Sequence[Sequence[Tensor]]) -> NormPlan:
        """The plan of ``groups``: the one kept in ``slot`` while it was built from the same tensors, else a new one."""
        entry = self._entries.get(slot)
        if entry is None or not _same_tensors(entry[0], entry[1], groups):
            held = [list(group) for group in groups]
            plan = NormPlan(held, sharded=self._sharded, process_group=self._process_group)
            entry = self._entries[slot] = (held, _storage(held), plan)
        return entry[2]

    def clear(self) -> None:
        """Drop every plan, and the tensors they hold."""
        self._entries.clear()


class _GroupParts:
    """The non-empty local parts of one group's tensors, in buckets reduced together.

    A bucket holds tensors of one device, replica count and dtype; on CPU, small tensors are further
    bucketed by shape (all 1-D ones together), so that a bucket can be packed with ``torch.cat``.
    ``replicas`` is how many ranks of the reduction group hold the same elements: 1 for a unique shard,
    ``k`` for a DTensor shard replicated over mesh dimensions of total size ``k``, 0 for "every rank" (a full
    tensor). When reduced, a part counts ``1 / replicas`` (``1 / world`` for 0) so that its copies add up to one.
    A bucket keeps the tensors as given; the last part of its key says whether they are their own local part
    (plain tensors) or need :func:`_localize` (DTensors, ZeRO-3 parameters) each time they are read.
    """

    def __init__(self, tensors: Iterable[Tensor], sharded: bool) -> None:
        self.buckets: dict[tuple[torch.device, int, torch.dtype, object, bool], list[Tensor]] = {}
        self.device: torch.device | None = None
        self.sharded = sharded
        plain = 1 if sharded else 0
        for tensor in tensors:  # the hot loop of the many-small-tensors case: keep it lean
            if type(tensor) in _PLAIN_TYPES and getattr(tensor, "ds_tensor", None) is None:
                local, replicas, own = tensor, plain, True
            else:
                local, replicas = local_part(tensor, sharded)
                own = local is tensor
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
                key = (device, replicas, local.dtype, pack, own)
                self.buckets.setdefault(key, []).append(tensor)

    def numel(self, world: int) -> float:
        """The group's element count, each local element counted ``1 / replicas`` (``1 / world`` for 0)."""
        return sum(
            sum(map(Tensor.numel, tensors if own else map(localize, tensors))) / (replicas or world)
            for (_, replicas, _, _, own), tensors in self.buckets.items()
        )


class _Bucket:
    """Tensors whose local parts are reduced together, packed into scratch buffers (``packed``) or one by one."""

    def __init__(self, tensors: list[Tensor], own: bool, packed: bool) -> None:
        self.tensors, self.own, self.packed = tensors, own, packed
        self.pieces = math.ceil(len(tensors) / _PACK_COUNT) if packed else len(tensors)

    def values(self) -> list[Tensor]:
        """``pieces`` tensors holding exactly the local elements: packed buffers, or the local parts themselves."""
        tensors = self.tensors if self.own else [localize(tensor) for tensor in self.tensors]
        if not self.packed:
            return tensors
        return [torch.cat(tensors[i : i + _PACK_COUNT]) for i in range(0, len(tensors), _PACK_COUNT)]

    def copies(self) -> list[Tensor]:
        """Copies of :meth:`values` (packed buffers already are)."""
        values = self.values()
        return values if self.packed else [value.clone() for value in values]


class _Stream:
    """The buckets whose pieces are reduced by one multi-tensor call: one device and accumulation dtype.

    ``owners`` and ``shares`` give, per piece in order, its group and the weight of its p-th power (1 / replicas).
    """

    def __init__(self, wide: torch.dtype) -> None:
        self.wide = wide
        self.buckets: list[_Bucket] = []
        self.owners: list[int] = []
        self.shares: list[float] = []

    def add(self, bucket: _Bucket, owner: int, replicas: int) -> None:
        self.buckets.append(bucket)
        self.owners += [owner] * bucket.pieces
        self.shares += [1 / replicas] * bucket.pieces


def _streams(parts: list[_GroupParts], world: int) -> list[_Stream]:
    """The groups' buckets, by device and accumulation dtype."""
    streams: dict[tuple[torch.device, torch.dtype], _Stream] = {}
    for index, part in enumerate(parts):
        for (device, replicas, dtype, pack, own), tensors in part.buckets.items():
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            bucket = _Bucket(tensors, own, packed=pack is not None and len(tensors) > 1)
            streams.setdefault((device, wide), _Stream(wide)).add(bucket, index, replicas or world)
    return list(streams.values())


def _same_tensors(held: list[list[Tensor]], storage: tuple[int, ...], groups: Sequence[Sequence[Tensor]]) -> bool:
    """Whether ``groups`` hold the tensor objects of ``held``, group by group, over the ``storage`` they had."""
    return (
        len(groups) == len(held)
        and all(len(a) == len(b) and all(map(operator.is_, a, b)) for a, b in zip(groups, held, strict=True))
        and _storage(groups) == storage
    )


def _storage(groups: Sequence[Sequence[Tensor]]) -> tuple[int, ...]:
    """Where every tensor's data starts (0 for tensors without storage of their own, such as DTensors)."""
    return tuple(map(Tensor.data_ptr, itertools.chain.from_iterable(groups)))


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


_PLAIN_TYPES = (Tensor, nn.Parameter)
_CPU = torch.device("cpu")
_FOREACH_NORM = _pick_foreach_norm()
