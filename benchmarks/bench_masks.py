"""Per-step cost of per-element weight-decay masks, against plain AdamW and a penalty added to the loss.

Model: 10 x ``Linear(1000, 1000, bias=False)`` = 10M float32 parameters; the first 5 layers (5M
parameters, half) carry a per-element mask of the same shape (random values in [0, 2]).

* ``no decay``: ``AdamW(weight_decay=0)``, the baseline of the ``decay ms`` column.
* ``plain``: ``AdamW(weight_decay=0.05)``, the optimizer's own decay, no mask.
* ``masked``: the same optimizer with :func:`lightning_nodecay.attach_weight_decay_hook`.
* ``penalty in loss``: the seed's approach: masked layers in a ``weight_decay=0`` group and
  ``0.5 * 0.05 * sum(mask * p**2)`` added to the loss and backpropagated (one more autograd graph
  every step; also the wrong semantics for AdamW, which is why the library decouples it).

Two timings per approach, median of ``--repeats`` after warm-up:

* ``step``: everything the approach does besides the model's own forward/backward: the optimizer
  step (hook included) for ``plain`` and ``masked``; penalty forward + backward + step for
  ``penalty in loss``.
* ``decay``: ``step`` minus the ``no decay`` step: what the weight decay itself costs.
* ``iteration``: a whole training iteration (forward, backward, step) on a batch of ``--batch``.

Run: ``python benchmarks/bench_masks.py [--threads 1] [--repeats 20] [--batch 16]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _bench import print_table
from torch import nn

from lightning_nodecay import attach_weight_decay_hook

LAYERS, WIDTH, WEIGHT_DECAY, LR = 10, 1000, 0.05, 1e-3


def build() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    masks = {f"{i}.weight": 2 * torch.rand(WIDTH, WIDTH) for i in range(LAYERS // 2)}
    return model, masks


Setup = tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor] | None]


def no_decay() -> Setup:
    model, _ = build()
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0), None


def plain() -> Setup:
    model, _ = build()
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), None


def masked() -> Setup:
    model, masks = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    attach_weight_decay_hook(optimizer, masks, module=model)
    return model, optimizer, None


def penalty_in_loss() -> Setup:
    model, masks = build()
    pairs = [(model.get_parameter(name), mask) for name, mask in masks.items()]
    masked_ids = {id(p) for p, _ in pairs}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in masked_ids]},
        {"params": [p for p, _ in pairs], "weight_decay": 0.0},
    ]

    def penalty() -> torch.Tensor:
        return 0.5 * WEIGHT_DECAY * sum((mask * p.pow(2)).sum() for p, mask in pairs)

    return model, torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY), penalty


def prepare(setup: Callable[[], Setup], batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The approach's own step work, and a whole training iteration."""
    model, optimizer, penalty = setup()
    x = torch.randn(batch, WIDTH)

    def step() -> None:
        if penalty is not None:
            penalty().backward()
        optimizer.step()

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        (loss if penalty is None else loss + penalty()).backward()
        optimizer.step()

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return step, iteration


def interleaved_median_ms(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms per run; the runs take turns, so load from other processes hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(3 + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= 3:  # warm-up rounds are not timed
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {"no decay": no_decay, "plain": plain, "masked": masked, "penalty in loss": penalty_in_loss}
    prepared = {name: prepare(setup, args.batch) for name, setup in setups.items()}
    steps = interleaved_median_ms({name: runs[0] for name, runs in prepared.items()}, args.repeats)
    iterations = interleaved_median_ms({name: runs[1] for name, runs in prepared.items()}, args.repeats)
    results = {name: (steps[name], iterations[name]) for name in setups}
    print(f"10M float32 parameters, 5M masked; torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    base_step, base_iter = results["plain"]
    rows = [
        (
            name,
            f"{step_ms:.1f}",
            f"{step_ms / base_step:.2f}x",
            f"{step_ms - results['no decay'][0]:.1f}",
            f"{iter_ms:.1f}",
            f"{iter_ms / base_iter:.2f}x",
        )
        for name, (step_ms, iter_ms) in results.items()
    ]
    print_table(("approach", "step ms", "vs plain", "decay ms", "iteration ms", "vs plain"), rows)
    masked_step, penalty_step = results["masked"][0], results["penalty in loss"][0]
    print(f"\nmasked step vs plain step: {masked_step / base_step:.2f}x (target <= 1.3x)")
    print(f"penalty-in-loss step vs masked step: {penalty_step / masked_step:.2f}x slower (target >= 2x)")


if __name__ == "__main__":
    main()
