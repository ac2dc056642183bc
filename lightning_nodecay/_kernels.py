"""The multi-tensor kernels of the weight-decay step hook: L2 and L1, coupled and decoupled. Pure PyTorch.

Each kernel takes the parameters, their gradients, optional per-element masks and optional references of one
batch, and the value to apply (``wd`` for the coupled style, ``lr * wd`` for the decoupled one), and updates in
place. With references the penalty is taken of ``p - p0`` instead of ``p`` (L2-SP): the coupled L2 step adds
``value * mask * (p - p0)`` to the gradient, the decoupled one moves ``p`` toward ``p0`` by that much, L1 uses
``sign(p - p0)`` (coupled) or the proximal step toward ``p0`` (decoupled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

TensorList = Union[list[Tensor], tuple[Tensor, ...]]  # noqa: UP007 (what `torch._foreach_*` takes)
Kernel = Callable[[list[Tensor], list[Tensor], "list[Tensor] | None", "list[Tensor] | None", float], None]


def _scaled_add(targets: TensorList, sources: TensorList, masks: TensorList | None, value: float) -> None:
    """``targets += value * sources * masks`` (masks of ones when ``None``), one multi-tensor op."""
    if masks is None:
        torch._foreach_add_(targets, sources, alpha=value)
    else:
        torch._foreach_addcmul_(targets, sources, masks, value=value)


def _offsets(params: list[Tensor], refs: list[Tensor] | None) -> TensorList:
    """What the penalty is taken of: the parameters, or their offsets from the references (a new buffer)."""
    return params if refs is None else torch._foreach_sub(params, refs)


def _coupled_l2(
    params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, refs: list[Tensor] | None, value: float
) -> None:
    if refs is not None and masks is None:  # grad += value * (p - p0), without a buffer
        torch._foreach_add_(grads, params, alpha=value)
        torch._foreach_add_(grads, refs, alpha=-value)
    else:
        _scaled_add(grads, _offsets(params, refs), masks, value)


def _coupled_l1(
    params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, refs: list[Tensor] | None, value: float
) -> None:
    offsets = _offsets(params, refs)
    _scaled_add(grads, torch._foreach_sign(offsets) if refs is None else _sign_(offsets), masks, value)


def _decoupled_l2(
    params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, refs: list[Tensor] | None, value: float
) -> None:
    if masks is None:
        torch._foreach_mul_(params, 1 - value)  # AdamW's own formula; toward p0: p = (1 - v) p + v p0
        if refs is not None:
            torch._foreach_add_(params, refs, alpha=value)
    else:
        torch._foreach_addcmul_(params, _offsets(params, refs), masks, value=-value)


def _decoupled_l1(
    params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, refs: list[Tensor] | None, value: float
) -> None:
    """Proximal step of ``value * mask * |p - p0|``: move each offset toward 0 by the threshold, stopping at 0.

    Soft-thresholding as ``offset - clamp(offset, -t, t)``, exactly 0 inside the threshold, so weights land exactly
    on 0 (or on their reference); the offsets are taken in place, with one temporary buffer for the clamped ones.
    """
    if refs is not None:
        torch._foreach_sub_(params, refs)  # the offsets, in place
    if masks is None:
        steps = torch._foreach_clamp_min(params, -value)
        torch._foreach_clamp_max_(steps, value)
    else:
        bounds = torch._foreach_mul(masks, value)
        steps = torch._foreach_maximum(params, torch._foreach_neg(bounds))
        torch._foreach_minimum_(steps, bounds)
    torch._foreach_sub_(params, steps)
    if refs is not None:  # p = p0 + the shrunk offset: exactly p0 inside the threshold
        torch._foreach_add_(params, refs)


def _sign_(tensors: TensorList) -> TensorList:
    torch._foreach_sign_(tensors)
    return tensors


KERNELS: dict[tuple[str, str], Kernel] = {
    ("coupled", "l2"): _coupled_l2,
    ("coupled", "l1"): _coupled_l1,
    ("decoupled", "l2"): _decoupled_l2,
    ("decoupled", "l1"): _decoupled_l1,
    ("independent", "l2"): _decoupled_l2,  # the decoupled step, with ``lr / lr0 * wd`` as its value
    ("independent", "l1"): _decoupled_l1,
}
