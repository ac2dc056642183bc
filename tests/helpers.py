"""Tiny models, Trainer settings and oracles shared by the tests, in the spirit of Lightning's ``BoringModel``."""

from __future__ import annotations

import functools
import os
import socket
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_nodecay import LRSchedulerCallable, NoDecayMixin, OptimizerCallable

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


def run_cli(model_class: type, tmp_path, *args: str, max_steps: int = 2) -> Any:
    """``LightningCLI(model_class)`` running ``fit`` with the Trainer of :func:`trainer_kwargs` and ``args``."""
    from pytorch_lightning.cli import LightningCLI

    trainer_args = [f"--trainer.{k}={v}" for k, v in trainer_kwargs(tmp_path, max_steps=max_steps).items()]
    return LightningCLI(model_class, args=["fit", *trainer_args, *args], save_config_callback=None)


def fit_with_checkpoints(tmp_path, model, max_steps, ckpt_path=None, callbacks=(), **overrides) -> pl.Trainer:
    """Fit ``model``; a run that does not resume saves ``epoch={e}-step={s}.ckpt`` after every epoch in ``tmp_path``."""
    if ckpt_path is None:
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1), *callbacks]
    kwargs = trainer_kwargs(
        tmp_path, max_steps=max_steps, enable_checkpointing=ckpt_path is None, callbacks=list(callbacks), **overrides
    )
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def lightning_pytorch_model(**declarations: Any) -> nn.Module:
    """A mixin model on the ``lightning.pytorch`` namespace: ``backbone`` (Linear + LayerNorm) and ``head``.

    Skips the calling test when the ``lightning`` package is not installed.
    """
    import pytest

    lightning = pytest.importorskip("lightning")

    class Net(NoDecayMixin, lightning.pytorch.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.head = nn.Linear(4, 1)
            self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
            for name, value in declarations.items():
                setattr(self, name, value)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.head(self.backbone(batch)).pow(2).mean()

        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(4, 4), batch_size=4)

    return Net()


def group_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[Any, list[str]]:
    """``{group name: [parameter names]}`` of ``optimizer``, names from ``model.named_parameters()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {g.get("name"): [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}


def state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """A copy of the optimizer's per-parameter state, keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        for p, state in optimizer.state.items()
    }


def assert_same_state(got: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    """Assert that two :func:`state_by_name` results hold the same parameters, keys and values, exactly."""
    assert got.keys() == expected.keys()
    for name, state in expected.items():
        assert got[name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got[name][key]), torch.as_tensor(value)), (name, key)


def assert_same_training(
    trainer: pl.Trainer, model: nn.Module, expected_trainer: pl.Trainer, expected: nn.Module
) -> None:
    """Assert that ``model`` ends with exactly the optimizer state and weights of ``expected``."""
    assert_same_state(
        state_by_name(trainer.optimizers[0], model), state_by_name(expected_trainer.optimizers[0], expected)
    )
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), name


def log_lines(log: Any, containing: str) -> list[str]:
    """The messages captured by the ``nodecay_log`` fixture that contain ``containing``."""
    return [r.getMessage() for r in log.records if containing in r.getMessage()]


def free_port() -> int:
    """A TCP port on localhost that is free now, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StateAtTrainStart(pl.Callback):
    """Records the optimizer state by parameter name, and the groups, right after Lightning restored them."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.state = state_by_name(optimizer, pl_module)
        self.groups = [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


#: The optimizers of the pure-PyTorch oracle tests (weight decay given by each test).
OPTIMIZERS = {
    "SGD-momentum": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "Adam": functools.partial(torch.optim.Adam, lr=0.01),
    "AdamW": functools.partial(torch.optim.AdamW, lr=0.01),
    "RMSprop": functools.partial(torch.optim.RMSprop, lr=0.01),
}
#: The optimizers of the Trainer-fit oracle tests: coupled and decoupled decay.
FIT_OPTIMIZERS = {
    "SGD": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.5),
    "AdamW": functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5),
}


def train(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 20,
    scheduler: Any = None,
    closure: bool = False,
) -> list[float]:
    """``steps`` steps of a ``(6 -> 3)`` float64 ``net`` on fixed random batches; returns the losses."""
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)

        def compute_loss(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            return loss.detach()

        losses.append(float(optimizer.step(compute_loss) if closure else (compute_loss(), optimizer.step())[0]))
        if scheduler is not None:
            scheduler.step()
    return losses


def assert_close(actual: Any, expected: Any) -> None:
    """Equal up to float64 rounding of the same computation done another way."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
