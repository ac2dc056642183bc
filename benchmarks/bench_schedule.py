"""How much `WeightDecayScheduler` costs per step: the time inside its hook as a share of training time.

Run: `python benchmarks/bench_schedule.py`. One thread, CPU, interleaved rounds, best of `--repeats`. The model is
the monitor benchmark's: 150 x (Linear(16, 16) + LayerNorm(16)), batch 4, AdamW on the library's groups, so a step
is short and any per-step overhead shows. The scheduler's hook is timed by a subclass (`perf_counter` around it).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from _bench import print_table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nodecay import WeightDecayScheduler, param_groups


class Net(pl.LightningModule):
    """150 x (Linear(16, 16) + LayerNorm(16)) and a squared-output loss, AdamW on decay / no_decay groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*(m for _ in range(150) for m in (nn.Linear(16, 16), nn.LayerNorm(16))))
        self.data = TensorDataset(torch.randn(4096, 16))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.body(batch[0]).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.body), lr=1e-3, weight_decay=0.05)


class TimedScheduler(WeightDecayScheduler):
    """The scheduler, with the time spent in its per-step hook added up."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.seconds += time.perf_counter() - start


def fit(steps: int, scheduler: TimedScheduler | None) -> float:
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[scheduler] if scheduler is not None else [],
        )
        start = time.perf_counter()
        trainer.fit(Net())
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lightning_nodecay").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    plain, scheduled, shares = float("inf"), float("inf"), []
    for _ in range(args.repeats):  # interleaved: load from other processes hits both alike
        plain = min(plain, fit(args.steps, None))
        scheduler = TimedScheduler(schedule="cosine", start=0.04, end=0.4, warmup_steps=10)
        total = fit(args.steps, scheduler)
        scheduled = min(scheduled, total)
        shares.append(scheduler.seconds / total)
    rows = [
        (
            f"{args.steps}",
            f"{plain:.2f}",
            f"{scheduled:.2f}",
            f"{scheduled / plain:.3f}",
            f"{min(shares):.3%}",
            f"{1e6 * min(shares) * scheduled / args.steps:.1f}",
        )
    ]
    print_table(("steps", "fit s", "fit + scheduler s", "ratio", "hook share (best)", "us per step"), rows)


if __name__ == "__main__":
    main()
