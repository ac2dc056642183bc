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

    def __init__(self, batch_size: int = 64, seed: int = 0, classes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.classes = batch_size, seed, classes

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        train, val = order[:1400], order[1400:]
        if self.classes is not None:  # keep only these digits
            keep = torch.isin(y, torch.tensor(self.classes))
            train, val = train[keep[train]], val[keep[val]]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


def prelu_backbone(width: int = 16) -> nn.Sequential:
    """Conv / BatchNorm / channel-wise PReLU blocks, like the seed's `nn.Sequential`: 8x8 image -> 8*width features."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.PReLU(width),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.PReLU(2 * width),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    )


def prelu_head(features: int = 128, classes: int = 10) -> nn.Sequential:
    """Linear / PReLU / linear classifier head."""
    return nn.Sequential(nn.Linear(features, 64), nn.PReLU(64), nn.Linear(64, classes))


class DigitsTask(pl.LightningModule):
    """Digit classification: cross-entropy training, `torchmetrics` validation accuracy; subclasses give `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_acc", self.val_accuracy)


class DigitsClassifier(DigitsTask):
    """A PReLU CNN (`backbone` + `head`)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = prelu_backbone()
        self.head = prelu_head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def prelu_slopes(self) -> torch.Tensor:
        """All PReLU slopes of the network, flattened."""
        return torch.cat([m.weight.detach().flatten() for m in self.modules() if isinstance(m, nn.PReLU)])
