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
from lightning_nodecay.norms import NormPlan


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


class StepRecorder(pl.Callback):
    """The oracle's own snapshots, one entry per batch that stepped: every parameter at the start of the batch
    (before anything in it can move them), its gradient at the first `on_before_optimizer_step`, and the
    parameters at the end of the batch."""

    def __init__(self) -> None:
        self.before: list[dict[torch.Tensor, torch.Tensor]] = []
        self.grads: list[dict[torch.Tensor, torch.Tensor]] = []
        self.after: list[dict[torch.Tensor, torch.Tensor]] = []
        self._before: dict[torch.Tensor, torch.Tensor] = {}
        self._grads: dict[torch.Tensor, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = {p: p.detach().clone() for p in pl_module.parameters()}
        self._grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param not in self._grads:
                    self._grads[param] = param.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._grads:  # the batch stepped
            self.before.append(self._before)
            self.grads.append(self._grads)
            self.after.append({param: param.detach().clone() for param in self._before})

    def ratio(self, step: int, params: list[torch.Tensor], norm_type: float | str = 2.0) -> float:
        """The update-to-weight ratio of ``params`` over optimizer step ``step``, in float64."""
        after = [self.after[step][p] for p in params]
        change = [a.double() - self.before[step][p].double() for a, p in zip(after, params, strict=True)]
        return norm(change, norm_type) / norm(after, norm_type)


class SGDModel(BoringModel):
    """Plain SGD (no momentum, no decay) on a named decay / no_decay pair: each step moves the weights by
    ``-lr * grad``."""

    lr = 0.1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": [self.layer.weight], "name": "decay"}, {"params": [self.layer.bias], "name": "no_decay"}]
        return torch.optim.SGD(groups, lr=self.lr)


@pytest.mark.parametrize("norm_type", [1, 2, "inf"])
def test_monitor_logs_the_update_ratio_of_an_sgd_step(tmp_path, norm_type):
    """Test that `update_ratio/{group}` is ||lr * grad|| / ||weights after the step||, the change a plain SGD step
    makes, computed by hand from the gradients, for every norm type."""
    model, recorder = SGDModel(), StepRecorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    monitor = WeightNormMonitor(norm_type=norm_type, log_update_ratio=True)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=4)
    pl.Trainer(**kwargs, callbacks=[monitor, recorder]).fit(model)
    for key, param in (("decay", model.layer.weight), ("no_decay", model.layer.bias)):
        ratios = logged(logger, f"update_ratio/{key}")
        assert list(ratios) == [0, 1, 2, 3]
        for step, value in ratios.items():
            change = norm([model.lr * recorder.grads[step][param]], norm_type)
            assert value == pytest.approx(change / norm([recorder.after[step][param]], norm_type), rel=1e-4)
            assert value == pytest.approx(recorder.ratio(step, [param], norm_type), rel=1e-5)
            assert value > 0


def test_monitor_logs_the_update_ratio_under_accumulation(tmp_path):
    """Test that under gradient accumulation the ratio covers the optimizer step of each logged batch (AdamW, with
    decay), on the same steps as `self.log` values, against weights snapshotted by hand."""
    model, recorder = SnapshotModel(), StepRecorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=3, accumulate_grad_batches=2, max_steps=7)
    pl.Trainer(**kwargs, callbacks=[WeightNormMonitor(log_update_ratio=True), recorder]).fit(model)
    assert len(recorder.after) == 7
    ratios = {key: logged(logger, f"update_ratio/{key}") for key in ("decay", "no_decay")}
    assert list(ratios["decay"]) == list(ratios["no_decay"]) == list(logged(logger, "loss")) == [2, 5]
    for step in (2, 5):
        assert ratios["decay"][step] == pytest.approx(recorder.ratio(step, [model.layer.weight]), rel=1e-5)
        assert ratios["no_decay"][step] == pytest.approx(recorder.ratio(step, [model.layer.bias]), rel=1e-5)


def test_monitor_logs_the_update_ratio_of_every_optimizer(tmp_path):
    """Test that with several optimizers (manual optimization) each group's ratio is keyed as its norms are, and
    is the change over that optimizer's step; gradient norms and updates come from the same logging step."""
    model, recorder = ThreeOptimizers(), StepRecorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    monitor = WeightNormMonitor(log_update_ratio=True, log_grad_norm=True)
    pl.Trainer(
        **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=6), callbacks=[monitor, recorder]
    ).fit(model)
    first, second, third = model.layers
    expected = {
        "SGD/decay": [first.weight],
        "SGD/no_decay": [first.bias],
        "SGD-1/pg1": list(second.parameters()),
        "Adam/pg1": list(third.parameters()),
    }
    assert {c for c in columns(logger) if c.startswith("update_ratio")} == {f"update_ratio/{k}" for k in expected}
    for key, params in expected.items():
        values = logged(logger, f"update_ratio/{key}")
        assert list(values) == [0, 1]
        for step, value in values.items():
            assert value == pytest.approx(recorder.ratio(step, params), rel=1e-5)
        grads = logged(logger, f"grad_2.0_norm/{key}")
        assert grads[1] == pytest.approx(norm([recorder.grads[1][p] for p in params]), rel=1e-5)


class LBFGSModel(BoringModel):
    """LBFGS (one group) runs the closure, and so `on_before_optimizer_step`, several times per step, moving the
    weights between the calls."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


def test_monitor_update_ratio_covers_a_whole_lbfgs_step(tmp_path):
    """Test that with a closure run several times per step the ratio is the change over the whole step, from the
    weights before its first closure call."""
    model, recorder = LBFGSModel(), StepRecorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=3)
    pl.Trainer(**kwargs, callbacks=[WeightNormMonitor(log_update_ratio=True), recorder]).fit(model)
    ratios = logged(logger, "update_ratio/pg1")
    assert list(ratios) == [0, 1, 2]
    for step, value in ratios.items():
        assert value == pytest.approx(recorder.ratio(step, list(model.parameters())), rel=1e-5)


def tensors_held(obj: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [tensor for child in children for tensor in tensors_held(child, seen)]


class HeldCopies(pl.Callback):
    """Counts the elements of the weights' copies a monitor holds (tensors of the weights' dtype that are not the
    model's parameters; the plan's own index tensors are integers and float64): after each batch, and just after
    each optimizer step (from the module's `optimizer_step`)."""

    def __init__(self, monitor: WeightNormMonitor) -> None:
        self.monitor = monitor
        self.after_batch: list[int] = []

    def count(self, pl_module: pl.LightningModule) -> int:
        params = {id(p) for p in pl_module.parameters()}
        held = tensors_held(self.monitor)
        return sum(t.numel() for t in held if t.dtype == torch.float32 and id(t) not in params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_batch.append(self.count(pl_module))


class CountsDuringStep(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.probe: HeldCopies | None = None
        self.during_step: list[int] = []

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.during_step.append(self.probe.count(self))


def test_monitor_keeps_weights_only_during_a_logged_step(tmp_path):
    """Test that the monitor copies the weights on logging steps only, holds the copy from just before the optimizer
    step to the end of that batch, and holds no copy between batches, nor any tensor once the fit ends."""
    model = CountsDuringStep()
    monitor = WeightNormMonitor(log_update_ratio=True)
    model.probe = probe = HeldCopies(monitor)
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=2, max_steps=6)
    pl.Trainer(**kwargs, callbacks=[monitor, probe]).fit(model)
    weights = sum(p.numel() for p in model.parameters())
    assert model.during_step == [0, weights, 0, weights, 0, weights]  # steps 1, 3 and 5 log
    assert probe.after_batch == [0] * 6
    assert list(logged(logger, "update_ratio/pg1")) == [1, 3, 5]
    assert tensors_held(monitor) == []  # teardown released the plans and the parameters they hold


class AddsGroupMidFit(pl.Callback):
    """Adds a param group with a new tensor before batch 2: the monitor's plan must follow."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            pl_module.extra = nn.Parameter(torch.full((3,), 2.0))
            trainer.optimizers[0].add_param_group({"params": [pl_module.extra], "name": "extra"})


def test_monitor_builds_its_plan_once_and_again_when_the_groups_change(tmp_path, monkeypatch):
    """Test that the monitor keeps its plan over logged steps and builds a new one when a group is added, whose
    norms it then logs."""
    built = []
    original = NormPlan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(NormPlan, "__init__", counting_init)
    model = SGDModel()
    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=5)
    pl.Trainer(**kwargs, callbacks=[WeightNormMonitor(), AddsGroupMidFit()]).fit(model)
    assert len(built) == 2  # one plan for steps 0 and 1, one for steps 2 to 4
    assert logged(logger, "weight_2.0_norm/extra") == pytest.approx(
        {2: math.sqrt(12), 3: math.sqrt(12), 4: math.sqrt(12)}
    )
    assert logged(logger, "weight_2.0_norm/decay")[4] == pytest.approx(norm([model.layer.weight]), rel=1e-5)


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


class RecordingLogger(pl.loggers.Logger):
    """A logger that keeps every `log_metrics` call, to count how often each key is logged at a step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))


def test_monitor_leaves_weight_decay_to_the_scheduler(tmp_path):
    """Test that with a `WeightDecayScheduler` logging it, `weight_decay/{group}` is logged once per step, not twice,
    while the monitor still logs the norms."""
    from lightning_nodecay import WeightDecayScheduler

    logger = RecordingLogger()
    scheduler = WeightDecayScheduler("linear", start=0.1, end=0.2, total_steps=3)
    monitor = WeightNormMonitor(log_weight_decay=True)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=3)
    pl.Trainer(**kwargs, callbacks=[scheduler, monitor]).fit(NoDecayBoringModel())
    per_step: dict[int, int] = {}
    for step, metrics in logger.calls:
        if "weight_decay/decay" in metrics:
            per_step[step] = per_step.get(step, 0) + 1
    assert per_step == {0: 1, 1: 1, 2: 1}
    assert any("weight_2.0_norm/decay" in metrics for _, metrics in logger.calls)
    values = [m["weight_decay/decay"] for _, m in logger.calls if "weight_decay/decay" in m]
    assert values == pytest.approx([0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3])
