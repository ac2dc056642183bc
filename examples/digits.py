"""Shared by the examples: scikit-learn's handwritten digits and a small PReLU CNN.

The digits (1,797 real 8x8 images in 10 classes) ship with scikit-learn: no download.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """The digits, scaled to [0, 1], split 1,400 train / 397 validation with a fixed seed."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = order[:1400], order[1400:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


def prelu_cnn(width: int = 16) -> nn.Sequential:
    """Conv / BatchNorm / channel-wise PReLU blocks and a linear head, like the seed's `nn.Sequential`."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.PReLU(width),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.PReLU(2 * width),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, 64),
        nn.PReLU(64),
        nn.Linear(64, 10),
    )


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy training and `torchmetrics` validation accuracy for a digits network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = prelu_cnn()
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_acc", self.val_accuracy)

    def prelu_slopes(self) -> torch.Tensor:
        """All PReLU slopes of the network, flattened."""
        return torch.cat([m.weight.detach().flatten() for m in self.net if isinstance(m, nn.PReLU)])
