"""The multi-tensor kernels of the weight-decay step hook: L2 and L1, coupled and decoupled. Pure PyTorch.

Each kernel takes the parameters, their gradients and optional per-element masks of one batch, and the
value to apply (``wd`` for the coupled style, ``lr * wd`` for the decoupled one), and updates in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

TensorList = Union[list[Tensor], tuple[Tensor, ...]]  # noqa: UP007 (what `torch._foreach_*` takes)
Kernel = Callable[[list[Tensor], list[Tensor], "list[Tensor] | None", float], None]


def _scaled_add(targets: TensorList, sources: TensorList, masks: TensorList | None, value: float) -> None:
    """``targets += value * sources * masks`` (masks of ones when ``None``), one multi-tensor op."""
    if masks is None:
        torch._foreach_add_(targets, sources, alpha=value)
    else:
        torch._foreach_addcmul_(targets, sources, masks, value=value)


def _coupled_l2(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    _scaled_add(grads, params, masks, value)


def _coupled_l1(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    _scaled_add(grads, torch._foreach_sign(params), masks, value)


def _decoupled_l2(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    if masks is None:
        torch._foreach_mul_(params, 1 - value)  # AdamW's own formula
    else:
        torch._foreach_addcmul_(params, params, masks, value=-value)


def _decoupled_l1(params: list[Tensor], grads: list[Tensor], masks: list[Tensor] | None, value: float) -> None:
    """Proximal step of ``value * mask * |p|``: shrink magnitudes by the threshold, stop at 0."""
    shrunk = torch._foreach_abs(params)
    if masks is None:
        torch._foreach_sub_(shrunk, value)
    else:
        torch._foreach_add_(shrunk, masks, alpha=-value)
    torch._foreach_clamp_min_(shrunk, 0.0)
    torch._foreach_sign_(params)
    torch._foreach_mul_(params, shrunk)


KERNELS: dict[tuple[str, str], Kernel] = {
    ("coupled", "l2"): _coupled_l2,
    ("coupled", "l1"): _coupled_l1,
    ("decoupled", "l2"): _decoupled_l2,
    ("decoupled", "l1"): _decoupled_l1,
    ("independent", "l2"): _decoupled_l2,  # the decoupled step, with ``lr / lr0 * wd`` as its value
    ("independent", "l1"): _decoupled_l1,
}
