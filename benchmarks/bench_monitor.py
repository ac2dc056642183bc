"""How much `WeightNormMonitor` costs: its norm computation, whole fits, and the time inside its hooks.

Run: `python benchmarks/bench_monitor.py` (about 5 minutes). One thread, CPU, best of `--repeats` runs.

1. The per-group norm computation over an optimizer's two param groups, by `group_norms` (which builds its plan)
   and by a kept plan (what the monitor runs on a logged step), against (a) the floor, one norm over a
   single contiguous buffer of as many elements, and (b) a per-parameter loop like Lightning's `grad_norm` (one
   `vector_norm` per tensor, then one per group over those norms).
2. Whole-`fit` wall time of a small CNN with and without the monitor, at `log_every_n_steps` 1 and 50.
3. The share of training time spent inside the monitor's hooks (timed with `perf_counter` around each hook by
   a subclass, logger calls included), on 150 x (Linear(16, 16) + LayerNorm(16)), batch 4, and the whole fit
   with the monitor against the same fit without it, in interleaved rounds (default monitor, with
   `log_update_ratio`, and at `log_every_n_steps=50`).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from _bench import best_time, print_table
from pytorch_lightning.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nodecay import WeightNormMonitor, group_norms, param_groups
from lightning_nodecay.norms import PlanCache


def per_parameter_loop(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-group norms the way a per-parameter utility gets them: one norm per tensor, then a norm of norms."""
    with torch.no_grad():
        return [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in g])) for g in groups]


def norm_computation(repeats: int) -> None:
    rows = []
    for count, size in ((5_000, 256), (100, 1_000_000)):
        module = nn.ParameterList(nn.Parameter(torch.randn(size)) for _ in range(count))
        for param in module:
            param.grad = param.detach()  # so that Lightning's `grad_norm` measures these very tensors
        groups = [list(module)[0::2], list(module)[1::2]]  # like decay / no_decay
        flat = torch.randn(count * size)
        plans = PlanCache()
        plans.plan(0, groups)
        ours = best_time(lambda groups=groups: group_norms(groups), repeats)
        reused = best_time(lambda groups=groups, plans=plans: plans.plan(0, groups).local(2.0).norms(2.0), repeats)
        floor = best_time(lambda flat=flat: torch.linalg.vector_norm(flat), repeats)
        loop = best_time(lambda groups=groups: per_parameter_loop(groups), repeats)
        lightning = best_time(lambda module=module: grad_norm(module, 2.0), repeats)
        times = (ours, reused, floor, loop, lightning)
        rows.append(
            (f"{count:,} x {size:,}", *(f"{t * 1e3:.2f}" for t in times), f"{reused / floor:.2f}x")
            + (f"{loop / ours:.2f}x",)
        )
        del module, groups, flat, plans
    print(
        "1. Norm computation, 2-norm, ms, of 2 param groups. group_norms: one call (the plan built anew); plan reused:"
    )
    print(
        "   the monitor's logged steps (`PlanCache.plan` + `local`); floor: one norm of one contiguous buffer as large;"
    )
    print("   per-param loop: one vector_norm per tensor, then one per group; Lightning grad_norm:")
    print("   `pytorch_lightning.utilities.grad_norm` on the same tensors (per-param + total)")
    header = ("tensors", "group_norms", "plan reused", "floor", "per-param loop", "Lightning grad_norm")
    print_table((*header, "reused / floor", "loop / group_norms"), rows)
    print()


class Net(pl.LightningModule):
    """A body, AdamW on the library's decay / no_decay groups, and a loss."""

    def __init__(self, body: nn.Module, data: TensorDataset, loss: Callable[..., torch.Tensor], batch: int) -> None:
        super().__init__()
        self.body, self.data, self.loss, self.batch = body, data, loss, batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return self.loss(self.body(inputs), targets)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.body), lr=1e-3, weight_decay=0.05)


def small_cnn() -> Net:
    body = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    data = TensorDataset(torch.randn(6_400, 1, 16, 16), torch.randint(0, 10, (6_400,)))
    return Net(body, data, nn.functional.cross_entropy, batch=32)


def linear_layernorm_stack() -> Net:
    body = nn.Sequential(*(layer for _ in range(150) for layer in (nn.Linear(16, 16), nn.LayerNorm(16))))
    data = TensorDataset(torch.randn(1_200, 16), torch.zeros(1_200, 16))
    return Net(body, data, nn.functional.mse_loss, batch=4)


class TimedWeightNormMonitor(WeightNormMonitor):
    """`WeightNormMonitor` with `perf_counter` around each of its hooks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0

    def _timed(self, hook: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().setup, *args, **kwargs)

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_train_start, *args, **kwargs)

    def on_before_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_before_optimizer_step, *args, **kwargs)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().on_train_batch_end, *args, **kwargs)

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().teardown, *args, **kwargs)


def timed_fit(make: Callable[[], Net], steps: int, every: int, monitor: TimedWeightNormMonitor | None) -> float:
    """Wall time of one `fit` of ``steps`` steps with a CSVLogger (with or without the monitor)."""
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        model = make()
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=pl.loggers.CSVLogger(root),
            log_every_n_steps=every,
            callbacks=[] if monitor is None else [monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(model)
        return time.perf_counter() - start


def whole_fit(repeats: int) -> None:
    rows = []
    for every in (1, 50):
        without, with_monitor, hooks = [], [], []
        for _ in range(repeats):  # interleaved, so that drifting machine load hits both alike
            without.append(timed_fit(small_cnn, 300, every, None))
            monitor = TimedWeightNormMonitor()
            with_monitor.append(timed_fit(small_cnn, 300, every, monitor))
            hooks.append(monitor.seconds)
        difference = f"{(min(with_monitor) / min(without) - 1) * 100:+.1f}%"
        rows.append((str(every), f"{min(without):.2f}", f"{min(with_monitor):.2f}", difference, f"{min(hooks):.3f}"))
    print("2. Whole fit, small CNN (2 conv + BN + linear, 10 tensors), 300 steps of batch 32, s")
    print_table(("log_every_n_steps", "without monitor", "with monitor", "difference", "in monitor hooks"), rows)
    print()


#: The fits of section 3: (log_every_n_steps, WeightNormMonitor arguments, or None for the fit without it).
HOOK_SHARE_CASES: tuple[tuple[int, dict[str, bool] | None], ...] = (
    (1, None),
    (1, {}),
    (1, {"log_update_ratio": True}),
    (50, None),
    (50, {}),
)


def hook_share(repeats: int) -> None:
    """Every case once per round, in an order reversed every other round, so that drifting load hits all alike."""
    fits: list[list[float]] = [[] for _ in HOOK_SHARE_CASES]
    hooks: list[list[float]] = [[] for _ in HOOK_SHARE_CASES]
    for round_ in range(repeats):
        order = list(enumerate(HOOK_SHARE_CASES))
        for case, (every, options) in order if round_ % 2 == 0 else reversed(order):
            monitor = None if options is None else TimedWeightNormMonitor(**options)
            fits[case].append(timed_fit(linear_layernorm_stack, 150, every, monitor))
            hooks[case].append(0.0 if monitor is None else monitor.seconds)
    plain = {every: min(fits[case]) for case, (every, options) in enumerate(HOOK_SHARE_CASES) if options is None}
    rows = []
    for case, (every, options) in enumerate(HOOK_SHARE_CASES):
        if options is None:
            continue
        fit, hook = min(fits[case]), min(hooks[case])
        monitor = ", ".join(f"{k}={v}" for k, v in options.items()) or "default"
        rows.append(
            (str(every), monitor, f"{plain[every]:.2f}", f"{fit:.2f}", f"{fit / plain[every]:.3f}")
            + (f"{hook * 1e3:.1f}", f"{hook / fit * 100:.2f}%")
        )
    print(
        "3. Time inside the monitor's hooks, 150 x (Linear(16,16) + LayerNorm(16)) = 600 tensors, 150 steps, batch 4;"
    )
    print(
        f"   best of {repeats} interleaved rounds; hooks / fit: the best hook time over the best fit with the monitor"
    )
    header = ("log_every_n_steps", "monitor", "plain fit s", "monitor fit s", "monitor / plain", "hooks ms")
    print_table((*header, "hooks / fit"), rows)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    timed_fit(small_cnn, 20, 1, TimedWeightNormMonitor())  # warm-up: imports, first-call costs
    norm_computation(max(args.repeats, 7))
    whole_fit(args.repeats)
    hook_share(args.repeats)


if __name__ == "__main__":
    main()
