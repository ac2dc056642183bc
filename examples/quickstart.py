"""Quickstart: weight decay on conv/linear weights only, in a real fit on CPU (well under a minute).

A small CNN with BatchNorm and PReLU learns scikit-learn's handwritten digits (8x8 images, bundled,
no download). `NoDecayMixin` builds the param groups; the summary printed at fit start says what
went where and why.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nodecay import NoDecayMixin


class DigitsNet(NoDecayMixin, pl.LightningModule):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.PReLU(16),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.PReLU(32),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
        # the optimizer's weight_decay applies to the `decay` group only
        self.optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.accuracy(self(x), y)
        self.log("val_acc", self.accuracy)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    model = DigitsNet()  # the mixin logs its group summary at fit start
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1 if args.quick else args.epochs,
        limit_train_batches=3 if args.quick else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val = digits_loaders()
    trainer.fit(model, train, val)
    groups = trainer.optimizers[0].param_groups
    print("optimizer groups:", [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups])
    print(f"validation accuracy: {trainer.callback_metrics['val_acc']:.3f}")


if __name__ == "__main__":
    main()
