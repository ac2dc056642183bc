"""Tiny models and data sets shared by the tests, in the spirit of Lightning's ``BoringModel``."""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_nodecay import NoDecayMixin


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


class TwoLayerModel(NoDecayMixin, pl.LightningModule):
    """``Linear(32, 4) -> tanh -> Linear(4, 2)``; the loss pulls the output to 1.

    The optimizer and scheduler are ``__init__`` arguments for the mixin to build, LightningCLI's dependency
    injection pattern (``--model.optimizer=...``).
    """

    def __init__(
        self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(32, 4), nn.Linear(4, 2)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.head(torch.tanh(self.body(batch))) - 1).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 24), batch_size=4)


class LayerNormNet(pl.LightningModule):
    """``Linear(8, 8) -> LayerNorm(8) -> Linear(8, 2)`` in ``net``, one batch per epoch (Lightning resumes an
    epoch-end checkpoint as mid-epoch, so with several batches a resumed run would see them in another order)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(8, 4), batch_size=4)


class NoDecayLayerNormNet(NoDecayMixin, LayerNormNet):
    """``LayerNormNet`` with the mixin, AdamW(lr=0.01, weight_decay=0.1), and the mixin attributes given."""

    def __init__(self, **declarations: Any) -> None:
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
        for name, value in declarations.items():
            setattr(self, name, value)


def backbone_head_class(namespace: Any = pl) -> type:
    """A mixin model class on a Lightning namespace: ``backbone`` (Linear + LayerNorm) and ``head``, AdamW."""

    class Net(NoDecayMixin, namespace.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.head = nn.Linear(4, 1)
            self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.head(self.backbone(batch)).pow(2).mean()

        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(4, 4), batch_size=4)

    return Net


#: ``backbone`` (Linear + LayerNorm) and ``head`` on the ``pytorch_lightning`` namespace.
BackboneHeadNet = backbone_head_class()


def lightning_pytorch_model(**declarations: Any) -> nn.Module:
    """:func:`backbone_head_class` on the ``lightning.pytorch`` namespace, with the mixin attributes given.

    Skips the calling test when the ``lightning`` package is not installed.
    """
    import pytest

    lightning = pytest.importorskip("lightning")
    model = backbone_head_class(lightning.pytorch)()
    for name, value in declarations.items():
        setattr(model, name, value)
    return model


class TanhNet(nn.Module):
    """``tanh(x @ w.T) @ v.T`` in float64, for the pure-PyTorch oracles; ``w`` (4, 6) is the tensor that gets masks."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))

    def weight(self) -> torch.Tensor:
        return self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight().T) @ self.v.T


def tanh_mlp() -> nn.Sequential:
    """``Linear(6, 4) -> Tanh -> Linear(4, 3)`` in float64, seeded (parameters ``0.weight``, ``0.bias``, ``2.*``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def norm_mlp() -> nn.Sequential:
    """``Linear(4, 4) -> LayerNorm(4) -> Linear(4, 2)``, seeded: two decayed weights, four excluded tensors."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


class Attention(nn.Module):
    """timm's (and MAE's) ViT attention: one ``qkv`` Linear, one ``proj`` Linear."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, attention, LayerNorm, MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2, self.mlp = (
            nn.LayerNorm(dim),
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTClassifier(pl.LightningModule):
    """A small ViT laid out like MAE's (timm's): ``cls_token``, ``pos_embed`` and ``patch_embed`` before ``blocks``
    (4 by default), then ``norm`` and ``head``. 1x8x8 images in 2x2 patches (16 tokens + the class token), 10 classes;
    random images and labels, 4 batches of 4 per epoch unless ``batches`` says otherwise."""

    def __init__(self, depth: int = 4, dim: int = 8, classes: int = 10, batches: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, dim, 2, stride=2)
        self.blocks = nn.Sequential(*(ViTBlock(dim) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.batches = batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x, y = (
            torch.rand(4 * self.batches, 1, 8, 8, generator=gen),
            torch.randint(0, 10, (4 * self.batches,), generator=gen),
        )
        return DataLoader(TensorDataset(x.to(self.dtype), y), batch_size=4)


class NoDecayViT(NoDecayMixin, ViTClassifier):
    """``ViTClassifier`` with the mixin, AdamW(lr=0.01, weight_decay=0.05), and the mixin attributes given (rules,
    ``lr_scheduler``, ``lr_scheduler_config``, ...)."""

    def __init__(self, batches: int = 4, **declarations: Any) -> None:
        super().__init__(batches=batches)
        self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.05)
        for name, value in declarations.items():
            setattr(self, name, value)
