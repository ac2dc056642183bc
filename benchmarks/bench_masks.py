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

Decay toward a reference (``GroupRules(weight_decay_toward="initial")``, L2-SP), second table: the optimizer
step alone (random gradients, no forward/backward), every optimizer ``foreach=True`` on CPU, best (and median) of
``--repeats`` interleaved rounds after warm-up, on the same 10M parameters:

* ``AdamW plain``: ``AdamW(weight_decay=0.05)`` toward zero, the baseline of the AdamW rows (1.00x);
* ``AdamW to init``: the hook's decoupled ``p -= lr * wd * (p - p0)`` on every layer;
* ``AdamW to init + masks``: the same, 5M parameters under a per-element mask;
* ``AdamW to init, L1``: ``weight_decay_l1`` toward the reference (the proximal step toward ``p0``);
* ``Adam plain`` / ``Adam to init`` and ``SGD plain`` / ``SGD to init``: coupled optimizers, ``grad += wd *
  (p - p0)``, each against its own plain step (``SGD(momentum=0.9)``).

The memory of the references is measured on the hook: the bytes of the distinct storages behind
``hook.references`` against the bytes of the parameters decayed toward a reference (1.00x: one copy each).

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

from lightning_nodecay import GroupRules, WeightDecayHook, attach_weight_decay_hook, decide, param_groups

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


TOWARD_INITIAL = GroupRules(weight_decay_toward="initial")
TOWARD_INITIAL_L1 = GroupRules(weight_decay_l1=("**",), weight_decay_toward="initial")


def reference_setup(optimizer_class: type[torch.optim.Optimizer], rules: GroupRules | None, masked_: bool = False):
    """``optimizer_class`` (foreach) on the 10M model: plain weight decay (``rules=None``), or the groups of
    ``rules`` with the step hook (toward the initial weights), per-element masks on half of them if ``masked_``."""

    def setup() -> Setup:
        model, masks = build()
        options = {"lr": LR, "weight_decay": WEIGHT_DECAY, "foreach": True}
        if optimizer_class is torch.optim.SGD:
            options["momentum"] = 0.9
        if rules is None:
            return model, optimizer_class(model.parameters(), **options), None
        optimizer = optimizer_class(param_groups(model, rules, weight_decay=WEIGHT_DECAY), **options)
        decisions = decide(model, rules)
        attach_weight_decay_hook(optimizer, masks if masked_ else None, module=model, decisions=decisions)
        return model, optimizer, None

    return setup


#: The toward-reference rows: ``{name: (setup, name of its baseline)}``.
REFERENCE_SETUPS = {
    "AdamW plain": (reference_setup(torch.optim.AdamW, None), "AdamW plain"),
    "AdamW to init": (reference_setup(torch.optim.AdamW, TOWARD_INITIAL), "AdamW plain"),
    "AdamW to init + masks": (reference_setup(torch.optim.AdamW, TOWARD_INITIAL, masked_=True), "AdamW plain"),
    "AdamW to init, L1": (reference_setup(torch.optim.AdamW, TOWARD_INITIAL_L1), "AdamW plain"),
    "Adam plain": (reference_setup(torch.optim.Adam, None), "Adam plain"),
    "Adam to init": (reference_setup(torch.optim.Adam, TOWARD_INITIAL), "Adam plain"),
    "SGD plain": (reference_setup(torch.optim.SGD, None), "SGD plain"),
    "SGD to init": (reference_setup(torch.optim.SGD, TOWARD_INITIAL), "SGD plain"),
}


def reference_memory(optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Measured on the hook: bytes of the distinct storages behind its references, bytes of the parameters decayed
    toward a reference, and how many references share storage with a parameter (0: all are copies)."""
    hook = WeightDecayHook.of(optimizer)
    assert hook is not None
    references = hook.references
    storages = {r.untyped_storage().data_ptr(): r.untyped_storage().nbytes() for r in references.values()}
    param_storages = {p.untyped_storage().data_ptr() for p in references}
    aliased = sum(r.untyped_storage().data_ptr() in param_storages for r in references.values())
    return sum(storages.values()), sum(p.nbytes for p in references), aliased


def interleaved_best_median_ms(
    runs: dict[str, Callable[[], None]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Best and median ms per run over ``repeats`` rounds after 3 warm-up rounds; the runs take turns, in
    alternating order, so load from other processes hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for round_ in range(3 + repeats):
        for name, run in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    best = {name: 1e3 * min(t) for name, t in times.items()}
    return best, {name: 1e3 * statistics.median(t) for name, t in times.items()}


def reference_table(repeats: int) -> None:
    """The toward-reference rows: optimizer step vs its plain baseline, and the references' measured memory."""
    optimizers = {}
    for name, (setup, _) in REFERENCE_SETUPS.items():
        model, optimizers[name], _ = setup()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    best, median = interleaved_best_median_ms({name: opt.step for name, opt in optimizers.items()}, repeats)
    hooked = {name: opt for name, opt in optimizers.items() if WeightDecayHook.of(opt) is not None}
    memory = {name: reference_memory(optimizer) for name, optimizer in hooked.items()}  # after the steps
    print(f"\nDecay toward the initial weights: optimizer step only, foreach, best / median of {repeats} rounds")
    rows = []
    for name, (_, baseline) in REFERENCE_SETUPS.items():
        refs = memory.get(name)
        share = "-" if refs is None else f"{refs[0] / 2**20:.1f} / {refs[1] / 2**20:.1f} MiB = {refs[0] / refs[1]:.2f}x"
        rows.append(
            (
                name,
                f"{best[name]:.1f}",
                f"{best[name] / best[baseline]:.2f}x",
                f"{median[name]:.1f}",
                f"{median[name] / median[baseline]:.2f}x",
                share,
            )
        )
    header = ("optimizer step", "best ms", "vs plain", "median ms", "vs plain", "references / decayed params")
    print_table(header, rows)
    aliased = sum(refs[2] for refs in memory.values())
    print(f"references sharing storage with their parameter: {aliased} (0: every reference is its own copy)")
    worst = max(best[name] / best[baseline] for name, (_, baseline) in REFERENCE_SETUPS.items() if "AdamW" in name)
    print(f"slowest AdamW toward-reference step vs plain AdamW step (best of {repeats}): {worst:.2f}x (target <= 1.3x)")


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
    del prepared, steps, iterations
    reference_table(args.repeats)


if __name__ == "__main__":
    main()
