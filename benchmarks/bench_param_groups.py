"""Time `param_groups` and the mixin's `configure_param_groups` on deep stacks of Linear+LayerNorm blocks with ties.

Run: `python benchmarks/bench_param_groups.py`. Prints a table; best of several rounds, one thread. Each
round times every function on every size, in alternating order, so load from other processes hits all
columns alike (the growth column compares sizes). Both library columns run the same code (`decide`, then
grouping); the mixin's adds only the LightningModule around the model.
The reference is timm's `param_groups_weight_decay`, written out below (timm is not a dependency):
it does far less (an `ndim` rule and a name list, no module types, patterns, declarations, ties
or wrappers) and is the speed users already accept.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from _bench import best_times, print_table
from torch import nn

from lightning_nodecay import NoDecayMixin, param_groups


def timm_param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-5, no_weight_decay_list=()):
    """timm's rule, as in `timm/optim/_param_groups.py`."""
    no_weight_decay_list = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def stack(tensors: int, width: int = 4) -> nn.Module:
    """`tensors / 4` blocks of Linear + LayerNorm; every 10th Linear shares its weight with the previous block."""
    blocks = nn.ModuleList()
    for i in range(tensors // 4):
        block = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
        if i % 10 == 9:
            block[0].weight = blocks[-1][0].weight
        blocks.append(block)
    return nn.Sequential(nn.ModuleDict({"blocks": blocks}))


class MixinModel(NoDecayMixin, pl.LightningModule):
    """The stack in a LightningModule with the mixin, whose `configure_param_groups` is timed."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [stack(size) for size in (1_000, 10_000, 40_000)]
    mixins = [MixinModel(model) for model in models]
    fns = [
        (
            lambda m=m: param_groups(m),
            lambda x=x: x.configure_param_groups(),
            lambda m=m: timm_param_groups_weight_decay(m),
        )
        for m, x in zip(models, mixins, strict=True)
    ]
    times = best_times([fn for triple in fns for fn in triple], args.repeats)
    rows, previous = [], None
    for model, ours, mixin, timm in zip(models, times[0::3], times[1::3], times[2::3], strict=True):
        registered = sum(1 for m in model.modules() for _ in m.parameters(recurse=False))
        growth = f"{ours / previous:.2f}" if previous else "-"
        rows.append(
            (
                f"{registered:,}",
                f"{ours * 1e3:.1f}",
                f"{mixin * 1e3:.1f}",
                f"{timm * 1e3:.1f}",
                f"{ours / timm:.2f}",
                f"{mixin / timm:.2f}",
                growth,
            )
        )
        previous = ours
    header = ("tensors", "param_groups ms", "mixin ms", "timm-style ms", "ours / timm", "mixin / timm", "growth")
    print_table(header, rows)
    print("(growth 10k -> 40k is for 4x the tensors: linear is 4.0)")


if __name__ == "__main__":
    main()
