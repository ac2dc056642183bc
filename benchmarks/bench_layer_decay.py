"""Time layer-wise learning-rate decay groups: `param_groups(..., GroupRules(layer_decay=...))` against timm's rule.

Run: `python benchmarks/bench_layer_decay.py`. Prints a table; best of several interleaved rounds, one thread.
The reference is timm's `param_groups_layer_decay`, written out below (timm is not a dependency) with the
layer map its `group_matcher` convention gives a ViT-style model (`^blocks\\.(\\d+)`, everything else before
the blocks at 0 and after them at the top). It does less than the library: an `ndim` rule and a name list for
weight decay, no module types, patterns, declarations, ties or wrappers, and no summary or names.
"""

from __future__ import annotations

import argparse
import re

import torch
from _bench import best_times, print_table
from torch import nn

from lightning_nodecay import GroupRules, param_groups

_BLOCK = re.compile(r"^blocks\.(\d+)")


def timm_layer_map(model: nn.Module) -> dict[str, int]:
    """The layer ids timm's `group_parameters(model, model.group_matcher(coarse=False), reverse=True)` gives here."""
    names = [name for name, _ in model.named_parameters()]
    blocks = {name: int(match.group(1)) + 1 for name in names if (match := _BLOCK.match(name))}
    depth = max(blocks.values(), default=0)
    return {name: blocks.get(name, 0 if name.startswith("embed") else depth + 1) for name in names}


def timm_param_groups_layer_decay(
    model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75
) -> list[dict]:
    """timm's rule, as in `timm/optim/_param_groups.py` (`param_groups_layer_decay`)."""
    no_weight_decay_list = set(no_weight_decay_list)
    param_groups: dict[str, dict] = {}
    layer_map = timm_layer_map(model)
    num_layers = max(layer_map.values()) + 1
    layer_max = num_layers - 1
    layer_scales = [layer_decay ** (layer_max - i) for i in range(num_layers)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = layer_map.get(name, layer_max)
        group_name = f"layer_{layer_id}_{g_decay}"
        if group_name not in param_groups:
            param_groups[group_name] = {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay, "params": []}
        param_groups[group_name]["params"].append(param)
    return list(param_groups.values())


def vit_like(tensors: int, width: int = 4) -> nn.Module:
    """`embed`, then `tensors / 4` blocks of Linear + LayerNorm in `blocks`, then `head`."""
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(tensors // 4))
    return nn.ModuleDict({"embed": nn.Linear(width, width), "blocks": blocks, "head": nn.Linear(width, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [vit_like(size) for size in (1_000, 10_000, 40_000)]
    rules = GroupRules(layer_decay=0.75)
    fns = [
        (
            lambda m=m: param_groups(m, rules, lr=1e-3, weight_decay=0.05),
            lambda m=m: timm_param_groups_layer_decay(m),
        )
        for m in models
    ]
    times = best_times([fn for pair in fns for fn in pair], args.repeats)
    rows = []
    for model, ours, timm in zip(models, times[0::2], times[1::2], strict=True):
        tensors = sum(1 for _ in model.parameters())
        rows.append((f"{tensors:,}", f"{ours * 1e3:.1f}", f"{timm * 1e3:.1f}", f"{ours / timm:.2f}"))
    print_table(("tensors", "param_groups + layer_decay ms", "timm-style ms", "ours / timm"), rows)


if __name__ == "__main__":
    main()
