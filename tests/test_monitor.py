"""Tests of ``WeightNormMonitor``: real Trainer fits on CPU, values checked against norms computed by hand."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fits import trainer_kwargs
from models import BoringModel, NoDecayBoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import WeightNormMonitor


def norm(tensors: list[torch.Tensor], norm_type: float | str = 2.0) -> float:
    """The oracle: one float64 vector norm over the concatenated tensors."""
    p = math.inf if norm_type == "inf" else float(norm_type)
    return torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in tensors]), p).item()


def logged(logger: pl.loggers.CSVLogger, key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` in the logger's metrics.csv."""
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(file) if row.get(key)}


def columns(logger: pl.loggers.CSVLogger) -> set[str]:
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        return set(next(csv.reader(file)))


def fit(tmp_path: Path, model: pl.LightningModule, monitor: WeightNormMonitor, **overrides) -> pl.loggers.CSVLogger:
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, **overrides)
    pl.Trainer(**kwargs, callbacks=[monitor]).fit(model)
    return logger


class SnapshotModel(NoDecayBoringModel):
    """Keeps its weight and bias after every optimizer step, and its gradients just before it."""

    def __init__(self) -> None:
        super().__init__()
        self.after_step: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append((self.layer.weight.grad.clone(), self.layer.bias.grad.clone()))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_step.append((self.layer.weight.detach().clone(), self.layer.bias.detach().clone()))


@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
def test_monitor_logs_post_step_norms(tmp_path, norm_type):
    """Test that every step logs the norms of each group's weights after that step's optimizer step."""
    model = SnapshotModel()
    logger = fit(tmp_path, model, WeightNormMonitor(norm_type=norm_type), max_steps=4)
    p = "inf" if norm_type == "inf" else float(norm_type)
    decay, no_decay, total = (logged(logger, f"weight_{p}_norm{key}") for key in ("/decay", "/no_decay", "_total"))
    assert list(decay) == list(no_decay) == list(total) == [0, 1, 2, 3]
    for step, (weight, bias) in enumerate(model.after_step):
        assert decay[step] == pytest.approx(norm([weight], norm_type), rel=1e-5)
        assert no_decay[step] == pytest.approx(norm([bias], norm_type), rel=1e-5)
        assert total[step] == pytest.approx(norm([weight, bias], norm_type), rel=1e-5)
    assert decay[3] == pytest.approx(norm([model.layer.weight], norm_type), rel=1e-5)  # the final weights


def test_monitor_names_unnamed_groups_like_lr_monitor(tmp_path):
    """Test that an unnamed group is keyed `pg1`, as LearningRateMonitor keys it."""
    model = BoringModel()
    logger = fit(tmp_path, model, WeightNormMonitor(), max_steps=2)
    assert {c for c in columns(logger) if c.startswith("weight")} == {"weight_2.0_norm/pg1", "weight_2.0_norm_total"}
    assert logged(logger, "weight_2.0_norm/pg1")[1] == pytest.approx(norm(list(model.parameters())), rel=1e-5)


class ThreeOptimizers(pl.LightningModule):
    """Manual optimization: SGD with named groups, a second SGD and an Adam, each on its own layer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(self.layers[2](self.layers[1](self.layers[0](batch))).pow(2).mean())
        for optimizer in self.optimizers():
            optimizer.step()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32), batch_size=4)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first, second, third = self.layers
        named = [{"params": [first.weight], "name": "decay"}, {"params": [first.bias], "name": "no_decay"}]
        return [
            torch.optim.SGD(named, lr=0.1),
            torch.optim.SGD(second.parameters(), lr=0.1),
            torch.optim.Adam(third.parameters(), lr=0.1),
        ]


def test_monitor_keys_several_optimizers_like_lr_monitor(tmp_path):
    """Test that with several optimizers the keys name the optimizer as LearningRateMonitor's do, with right values."""
    model = ThreeOptimizers()
    logger = fit(tmp_path, model, WeightNormMonitor(), max_steps=6)  # 3 optimizer steps per batch: 2 batches
    expected = {
        "weight_2.0_norm/SGD/decay": [model.layers[0].weight],
        "weight_2.0_norm/SGD/no_decay": [model.layers[0].bias],
        "weight_2.0_norm/SGD-1/pg1": list(model.layers[1].parameters()),
        "weight_2.0_norm/Adam/pg1": list(model.layers[2].parameters()),
        "weight_2.0_norm_total": list(model.parameters()),
    }
    assert {c for c in columns(logger) if c.startswith("weight")} == set(expected)
    for key, params in expected.items():
        values = logged(logger, key)
        assert list(values) == [0, 1]  # one step per batch, as Lightning logs `self.log` values
        assert values[1] == pytest.approx(norm(params), rel=1e-5)


def test_monitor_follows_log_every_n_steps_and_accumulation(tmp_path):
    """Test that with accumulation the monitor logs on the same steps as `self.log` and LearningRateMonitor."""
    model = SnapshotModel()
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=3, accumulate_grad_batches=2, max_steps=7)
    lr_monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    pl.Trainer(**kwargs, callbacks=[WeightNormMonitor(), lr_monitor]).fit(model)
    decay = logged(logger, "weight_2.0_norm/decay")
    assert len(model.after_step) == 7
    assert list(decay) == [2, 5]  # after optimizer steps 3 and 6 (batches 6 and 12)
    assert list(logged(logger, "loss")) == list(logged(logger, "lr-AdamW/decay")) == [2, 5]
    for step in decay:
        assert decay[step] == pytest.approx(norm([model.after_step[step][0]]), rel=1e-5)


def test_monitor_logs_grad_norms_before_the_step(tmp_path):
    """Test that `log_grad_norm` logs each group's gradient norm as the optimizer step sees it."""
    model = SnapshotModel()
    logger = fit(tmp_path, model, WeightNormMonitor(norm_type="inf", log_grad_norm=True), max_steps=3)
    decay, no_decay = logged(logger, "grad_inf_norm/decay"), logged(logger, "grad_inf_norm/no_decay")
    assert list(decay) == list(no_decay) == [0, 1, 2]
    for step, (weight_grad, bias_grad) in enumerate(model.grads):
        assert decay[step] == pytest.approx(norm([weight_grad], "inf"), rel=1e-5)
        assert no_decay[step] == pytest.approx(norm([bias_grad], "inf"), rel=1e-5)


def test_monitor_logs_rms(tmp_path):
    """Test that `log_rms` logs the 2-norm over the square root of the group's number of elements."""
    model = NoDecayBoringModel()
    logger = fit(tmp_path, model, WeightNormMonitor(log_rms=True), max_steps=2)
    assert logged(logger, "weight_rms/decay")[1] == pytest.approx(norm([model.layer.weight]) / math.sqrt(64), rel=1e-5)
    assert logged(logger, "weight_rms/no_decay")[1] == pytest.approx(norm([model.layer.bias]) / math.sqrt(2), rel=1e-5)


class MaskShareModel(NoDecayBoringModel):
    """The decay group carries the keys per-element masks set: the decay moved to `hook_weight_decay`, and the
    share of masked elements. They are written by hand, without a hook, so the invariant check is off."""

    check_weight_decay = False

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        decay = optimizer.param_groups[0]
        decay.update(weight_decay=0.0, hook_weight_decay=0.1, weight_decay_mask_share=0.25)
        return optimizer


def test_monitor_logs_weight_decay_and_mask_share(tmp_path):
    """Test that `log_weight_decay` logs each group's effective decay, and the mask share where a group has one."""
    logger = fit(tmp_path, MaskShareModel(), WeightNormMonitor(log_weight_decay=True), max_steps=2)
    assert logged(logger, "weight_decay/decay") == {0: 0.1, 1: 0.1}  # the hook's decay, not the optimizer's 0
    assert logged(logger, "weight_decay/no_decay") == {0: 0.0, 1: 0.0}
    assert logged(logger, "weight_decay_mask_share/decay") == {0: 0.25, 1: 0.25}
    assert "weight_decay_mask_share/no_decay" not in columns(logger)


def test_monitor_writes_tensorboard_scalars(tmp_path):
    """Test that the norms reach a TensorBoard event file."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    model = NoDecayBoringModel()
    logger = pl.loggers.TensorBoardLogger(tmp_path)
    pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1), callbacks=[WeightNormMonitor()]).fit(
        model
    )
    events = event_accumulator.EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = events.Scalars("weight_2.0_norm/decay")
    assert [s.step for s in scalars] == [0, 1, 2]
    assert scalars[-1].value == pytest.approx(norm([model.layer.weight]), rel=1e-5)
    assert "weight_2.0_norm_total" in events.Tags()["scalars"]


def test_monitor_without_logger_raises(tmp_path):
    """Test that a Trainer without logger is refused before training, naming the callback."""
    model = NoDecayBoringModel()
    weight = model.layer.weight.detach().clone()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False), callbacks=[WeightNormMonitor()])
    with pytest.raises(ValueError, match="Cannot use `WeightNormMonitor` callback with a `Trainer` that has no logger"):
        trainer.fit(model)
    assert torch.equal(model.layer.weight, weight)


@pytest.mark.parametrize("norm_type", [0, -2.0, "two", None])
def test_monitor_rejects_bad_norm_type(norm_type):
    """Test that a bad `norm_type` is refused when the callback is built, naming the argument."""
    with pytest.raises(ValueError, match="`norm_type` must be a positive number or 'inf'"):
        WeightNormMonitor(norm_type=norm_type)


def test_monitor_rms_needs_norm_type_2():
    """Test that `log_rms` with another norm is refused, naming both arguments."""
    with pytest.raises(ValueError, match="`log_rms=True` needs `norm_type=2`"):
        WeightNormMonitor(norm_type="inf", log_rms=True)


class DuplicateGroupNames(BoringModel):
    def configure_optimizers(self):
        groups = [{"params": [self.layer.weight], "name": "a"}, {"params": [self.layer.bias], "name": "a"}]
        return torch.optim.SGD(groups, lr=0.1)


def test_monitor_rejects_duplicate_group_names(tmp_path):
    """Test that groups of one optimizer sharing a name are refused before the first step."""
    model = DuplicateGroupNames()
    kwargs = trainer_kwargs(tmp_path, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    trainer = pl.Trainer(**kwargs, callbacks=[WeightNormMonitor()])
    with pytest.raises(ValueError, match="param groups of `SGD` named `a`"):
        trainer.fit(model)
    assert trainer.global_step == 0


def test_monitor_works_with_lightning_pytorch_trainer(tmp_path):
    """Test that the same class is accepted by a `lightning.pytorch.Trainer` and logs there."""
    lightning = pytest.importorskip("lightning.pytorch")

    class Model(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(32, 2)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).pow(2).mean()

        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomDataset(32), batch_size=4)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([{"params": [self.layer.weight], "name": "decay"}], lr=0.1)

    monitor = WeightNormMonitor()
    assert isinstance(monitor, lightning.Callback)
    assert isinstance(monitor, pl.Callback)
    model = Model()
    logger = lightning.loggers.CSVLogger(tmp_path)
    lightning.Trainer(**trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1), callbacks=[monitor]).fit(model)
    assert logged(logger, "weight_2.0_norm/decay")[2] == pytest.approx(norm([model.layer.weight]), rel=1e-5)


def test_monitor_under_ddp_logs_the_norms_of_the_weights(tmp_path):
    """Test a real 2-process DDP fit on CPU: the safety net splits on every rank, the summary is logged once,
    and rank 0 logs the norms of the (replicated) final weights."""
    script = Path(__file__).parent / "scripts" / "ddp_monitor.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], check=True, capture_output=True, text=True, timeout=240
    )
    for rank in range(2):
        groups = json.loads((tmp_path / f"groups_rank{rank}.json").read_text())
        assert groups == [["decay", 1, 0.1], ["no_decay", 1, 0.0]]
    assert result.stderr.count("Weight decay groups of `HandWrittenOptimizer`") == 1
    assert result.stderr.count("NoDecayMixin safety net: AdamW group `pg1`: moved 1 excluded tensor (layer.bias)") == 1
    weights = [torch.load(tmp_path / f"final_rank{rank}.pt") for rank in range(2)]
    assert torch.equal(weights[0]["layer.weight"], weights[1]["layer.weight"])
    logger_dir = tmp_path / "csv" / "version_0"
    with open(logger_dir / "metrics.csv") as file:
        rows = {int(row["step"]): row for row in csv.DictReader(file)}
    assert sorted(rows) == [0, 1, 2]
    final = weights[0]
    assert float(rows[2]["weight_2.0_norm/decay"]) == pytest.approx(norm([final["layer.weight"]]), rel=1e-5)
    assert float(rows[2]["weight_2.0_norm/no_decay"]) == pytest.approx(norm([final["layer.bias"]]), rel=1e-5)
    assert float(rows[2]["weight_2.0_norm_total"]) == pytest.approx(norm(list(final.values())), rel=1e-5)
    assert float(rows[2]["grad_2.0_norm/decay"]) > 0
