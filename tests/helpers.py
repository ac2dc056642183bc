"""Tiny models and Trainer settings in the spirit of Lightning's ``BoringModel``."""

from __future__ import annotations

import functools
import os

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_nodecay import NoDecayMixin

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(1)


class RandomDataset(Dataset):
    """``length`` random vectors of ``size`` features, fixed by seed."""

    def __init__(self, size: int = 32, length: int = 64, seed: int = 0) -> None:
        self.data = torch.randn(length, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class BoringModel(pl.LightningModule):
    """One ``Linear(32, 2)``: a 2-D weight and a 1-D bias; loss pulls the output to zero."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(self.in_features), batch_size=4)

    @property
    def in_features(self) -> int:
        return 32

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoDecayBoringModel(NoDecayMixin, BoringModel):
    """``BoringModel`` with the mixin and AdamW(weight_decay=0.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    """Small, quiet CPU Trainer arguments."""
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return kwargs
