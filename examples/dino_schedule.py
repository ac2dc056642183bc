"""DINO's weight-decay schedule, with every exclusion and multiplier kept, and a picture of it next to the norms.

DINO (Caron et al., 2021) raises the weight decay of its ViT from 0.04 to 0.4 along a cosine over training
(`utils.cosine_scheduler`), and decays neither biases nor norm parameters. `WeightDecayScheduler("cosine", ...)`
computes exactly DINO's values, here after a short linear warm-up from 0, and gives every param group
base(t) x its multiplier at every optimizer step: `no_decay` (biases, BatchNorm, PReLU slopes) stays at exactly
0, and a multiplier group (here the classifier's last layer at half the base, for illustration) follows at half
the base. The invariant checked before every step holds throughout.

The model is the small PReLU CNN of `digits.py` on scikit-learn's 1,797 handwritten 8x8 digits (no download).
`WeightNormMonitor` logs each group's weight norm and the scheduler each group's weight decay to one CSVLogger;
`plot_weight_norms(..., weight_decay=True)` draws both, the schedule in a panel under the norms.

    python examples/dino_schedule.py            # 30 epochs, about 90 s on 2 CPU cores
    python examples/dino_schedule.py --quick    # a few steps (tests)
"""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.loggers import CSVLogger

from lightning_nodecay import NoDecayMixin, WeightDecayScheduler, WeightNormMonitor, plot_weight_norms


class DinoDigits(NoDecayMixin, DigitsClassifier):
    """The library's defaults (no decay on biases, BatchNorm and PReLU slopes), and the last layer at half the base."""

    weight_decay_multipliers = {"head.2.weight": 0.5}  # noqa: RUF012

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def last_values(metrics_csv: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every ``{prefix}{group}`` column."""
    found: dict[str, float] = {}
    with open(metrics_csv) as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key.startswith(prefix) and value:
                    found[key[len(prefix) :]] = float(value)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--start", type=float, default=0.04, help="DINO's --weight_decay")
    parser.add_argument("--end", type=float, default=0.4, help="DINO's --weight_decay_end")
    parser.add_argument("--warmup-steps", type=int, default=44, help="linear warm-up from 0 (44 steps: 2 epochs)")
    parser.add_argument("--out", type=Path, default=Path("runs/dino_schedule"))
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)

    scheduler = WeightDecayScheduler(
        "cosine", start=args.start, end=args.end, warmup_steps=2 if args.quick else args.warmup_steps
    )  # its length: the fit's optimizer steps
    logger = CSVLogger(args.out, name="", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2 if args.quick else args.epochs,
        limit_train_batches=5 if args.quick else None,
        limit_val_batches=1 if args.quick else None,
        log_every_n_steps=1 if args.quick else 4,
        logger=logger,
        callbacks=[WeightNormMonitor(), scheduler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DinoDigits(args.lr, weight_decay=args.start)
    trainer.fit(model, DigitsDataModule())

    steps, warmup = trainer.global_step, scheduler.warmup_steps
    print(f"DINO's cosine weight decay over {steps} optimizer steps, after a {warmup}-step warm-up from 0:")
    print(f"  base at step {warmup}: {scheduler.value(warmup):.4f}, at the last step: {scheduler.value(steps - 1):.4f}")
    metrics = Path(logger.log_dir) / "metrics.csv"
    decays, norms = last_values(metrics, "weight_decay/"), last_values(metrics, "weight_2.0_norm/")
    for group, decay in decays.items():
        print(f"  {group:<14} weight_decay={decay:.4f}  weight 2-norm={norms[group]:.3f}")
    print(f"final validation accuracy: {final_accuracy(metrics):.3f}")
    png = plot_weight_norms(
        metrics, args.out / "dino_schedule.png", weight_decay=True, title="Per-group weight norms, DINO's weight decay"
    )
    print(f"wrote {png}")


def final_accuracy(metrics_csv: Path) -> float:
    """The last validation accuracy logged."""
    with open(metrics_csv) as file:
        return [float(row["val_acc"]) for row in csv.DictReader(file) if row.get("val_acc")][-1]


if __name__ == "__main__":
    main()
