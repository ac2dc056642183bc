"""Does weight decay on PReLU slopes matter? The seed's experiment, on real data, in pictures.

PyTorch's `nn.PReLU` docs say weight decay should not be used when learning the slopes, and the
Kafnet paper warns that L2 on them biases the network toward plain ReLU. This script trains the
same PReLU CNN (same seed, same data: scikit-learn's 1,797 handwritten 8x8 digits) twice:

  (a) `plain`:   AdamW's weight decay on every parameter, as `AdamW(model.parameters(), ...)` does;
  (b) `nodecay`: `NoDecayMixin` defaults: no decay on biases, BatchNorm and PReLU slopes.

Both log to a CSVLogger with `WeightNormMonitor` and `LearningRateMonitor`. At the end it prints a
table (validation accuracy, mean |PReLU slope|, group norms) and writes one PNG with the per-group
weight norms over steps of both runs and the distribution of the PReLU slopes.

    python examples/prelu_digits.py              # about 75 s on 2 CPU cores
    python examples/prelu_digits.py --quick      # a few steps (tests)
"""

from __future__ import annotations

import argparse
import csv
import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger

from lightning_nodecay import NoDecayMixin, WeightNormMonitor, param_groups

NORM_KEY = "weight_2.0_norm/"


class PlainDecayNet(DigitsClassifier):
    """Run (a): the same two groups as the library computes, but the optimizer's weight decay on both."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = param_groups(self)
        for group in groups:
            group.pop("weight_decay", None)  # `no_decay` decayed too: what plain AdamW(parameters()) does
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)


class NoDecayNet(NoDecayMixin, DigitsClassifier):
    """Run (b): the library's defaults."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def train(model: DigitsClassifier, name: str, out: Path, args: argparse.Namespace) -> dict[str, object]:
    logger = CSVLogger(out, name=name, version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2 if args.quick else args.epochs,
        limit_train_batches=5 if args.quick else None,
        limit_val_batches=1 if args.quick else None,
        log_every_n_steps=1 if args.quick else 5,
        logger=logger,
        callbacks=[WeightNormMonitor(), LearningRateMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule())
    norms, accuracies = read_metrics(Path(logger.log_dir) / "metrics.csv")
    return {
        "name": name,
        "val_acc": accuracies[-1],
        "best_val_acc": max(accuracies),
        "slopes": model.prelu_slopes(),
        "norms": norms,
    }


def read_metrics(metrics_csv: Path) -> tuple[dict[str, tuple[list[int], list[float]]], list[float]]:
    """``{group: (steps, values)}`` of the weight norms the monitor logged, and the validation accuracies."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    accuracies = []
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("val_acc"):
                accuracies.append(float(row["val_acc"]))
            for key, value in row.items():
                if key.startswith(NORM_KEY) and value:
                    steps, values = series.setdefault(key[len(NORM_KEY) :], ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series, accuracies


def report(runs: list[dict[str, object]]) -> str:
    header = ("run", "final val acc", "best val acc", "mean |PReLU slope|", "decay-group norm", "no_decay-group norm")
    rows = [
        (
            str(run["name"]),
            f"{run['val_acc']:.3f}",
            f"{run['best_val_acc']:.3f}",
            f"{run['slopes'].abs().mean():.4f}",  # type: ignore[union-attr]
            f"{run['norms']['decay'][1][-1]:.3f}",  # type: ignore[index]
            f"{run['norms']['no_decay'][1][-1]:.3f}",  # type: ignore[index]
        )
        for run in runs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[dict[str, object]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (norms_ax, slopes_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=90)
    styles, colors = {"plain": "--", "nodecay": "-"}, {"decay": "tab:blue", "no_decay": "tab:orange"}
    for run in runs:
        for group, (steps, values) in run["norms"].items():  # type: ignore[attr-defined]
            style = styles[str(run["name"])]
            norms_ax.plot(steps, values, style, color=colors.get(group), label=f"{run['name']}: {group}")
    norms_ax.set(xlabel="step", ylabel="weight 2-norm", title="Per-group weight norms", yscale="log")
    norms_ax.legend()
    bins = torch.linspace(-0.5, 1.5, 61).tolist()
    for run in runs:
        slopes = run["slopes"].numpy()  # type: ignore[attr-defined]
        slopes_ax.hist(slopes, bins=bins, alpha=0.6, label=f"{run['name']} (mean |a| {abs(slopes).mean():.3f})")
    slopes_ax.axvline(0.25, color="grey", linewidth=1, linestyle=":", label="PReLU init 0.25")
    slopes_ax.set(xlabel="PReLU slope a", ylabel="count", title="PReLU slopes after training")
    slopes_ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("runs/prelu_digits"))
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    runs = []
    for name, model_class in (("plain", PlainDecayNet), ("nodecay", NoDecayNet)):
        pl.seed_everything(0, verbose=False)  # same initial weights and batches for both runs
        runs.append(train(model_class(args.lr, args.weight_decay), name, args.out, args))
    print(report(runs))
    png = args.out / "prelu_digits.png"
    plot(runs, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
