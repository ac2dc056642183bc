"""Trainer settings and fit helpers shared by the tests: quiet CPU Trainers, LightningCLI runs, probes, log lines."""

from __future__ import annotations

import functools
import socket
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from oracles import state_by_name
from pytorch_lightning.callbacks import ModelCheckpoint

#: The optimizers of the Trainer-fit oracle tests: coupled and decoupled decay.
FIT_OPTIMIZERS = {
    "SGD": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.5),
    "AdamW": functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5),
}


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


def ddp_trainer(out, callbacks: list) -> pl.Trainer:
    """A 2-process DDP Trainer on CPU for the test scripts: 3 steps, logging every step to ``out/csv/version_0``."""
    logger = pl.loggers.CSVLogger(out, name="csv", version=0)
    kwargs = trainer_kwargs(out, strategy="ddp", devices=2, max_steps=3, log_every_n_steps=1, logger=logger)
    return pl.Trainer(**kwargs, callbacks=callbacks)


def run_cli(model_class: type, tmp_path, *args: str, max_steps: int = 2) -> Any:
    """``LightningCLI(model_class)`` running ``fit`` with the Trainer of :func:`trainer_kwargs` and ``args``.

    Skips the calling test when ``jsonargparse`` (LightningCLI's parser) is not installed.
    """
    pytest.importorskip("jsonargparse")
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


def log_lines(log: Any, containing: str) -> list[str]:
    """The messages captured by the ``nodecay_log`` fixture that contain ``containing``."""
    return [r.getMessage() for r in log.records if containing in r.getMessage()]


def free_port() -> int:
    """A TCP port on localhost that is free now, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RecordsStateAtTrainStart:
    """Records the optimizer state by parameter name, and the groups, right after Lightning restored them."""

    state: dict[str, dict[str, Any]]
    groups: list[tuple[Any, Any, Any]]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0]
        self.state = state_by_name(optimizer, pl_module)
        self.groups = [(g["name"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@functools.cache
def _state_probe_class(namespace: ModuleType) -> type:
    return type("StateAtTrainStart", (_RecordsStateAtTrainStart, namespace.Callback), {"__module__": __name__})


def state_at_train_start(namespace: ModuleType = pl) -> Any:
    """A probe callback on ``namespace.Callback`` (``pytorch_lightning`` or ``lightning.pytorch``, the namespace of
    the Trainer it is handed to) that records, in ``state`` and ``groups``, the optimizer state by parameter name and
    the groups' ``(name, lr, weight_decay)`` right after Lightning restored them."""
    return _state_probe_class(namespace)()
