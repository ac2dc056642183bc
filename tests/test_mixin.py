import csv
import functools

import pytest
import pytorch_lightning as pl
import torch
from fits import FIT_OPTIMIZERS, log_lines, run_cli, trainer_kwargs
from models import BoringModel, NoDecayBoringModel, TwoLayerModel, lightning_pytorch_model
from oracles import assert_all_close, group_names
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.tuner import Tuner
from torch import nn

from lightning_nodecay import DEFAULT_NO_DECAY_PARAM_NAMES, NoDecayMixin


class ZeroGradModel(NoDecayBoringModel):
    """Loss with zero gradient: every change of a weight is weight decay alone (an exact oracle)."""

    def training_step(self, batch, batch_idx):
        return self(batch).sum() * 0.0


def test_mixin_groups_reach_the_optimizer(tmp_path):
    """Test that a fit builds `decay` / `no_decay` groups with the optimizer's decay on `decay` only."""
    model = NoDecayBoringModel()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model)
    groups = trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    assert groups[0]["params"] == [model.layer.weight]
    assert groups[1]["params"] == [model.layer.bias]


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_mixin_fit_decays_weights_only(tmp_path, optimizer_class):
    """Test against the closed form: with zero gradients, weights shrink by (1 - lr*wd)^steps, biases stay."""
    model = ZeroGradModel()
    model.optimizer = functools.partial(optimizer_class, lr=0.5, weight_decay=0.2)
    weight, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4)).fit(model)
    torch.testing.assert_close(model.layer.weight.detach(), weight * (1 - 0.5 * 0.2) ** 4)
    torch.testing.assert_close(model.layer.bias.detach(), bias)


class PReLUNet(NoDecayMixin, pl.LightningModule):
    """The seed's PReLU CNN, as a LightningModule with the mixin."""

    def __init__(self, optimizer=None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.PReLU(4), nn.Conv2d(4, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 3), nn.Flatten()
        )
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.002, weight_decay=1e-5)

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 1, 7, 7), batch_size=4)


def test_mixin_seed_prelu_slopes_not_decayed(tmp_path):
    """Test that PReLU slopes land in `no_decay` in a real fit of the seed's model."""
    model = PReLUNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(model)
    no_decay = trainer.optimizers[0].param_groups[1]
    assert no_decay["name"] == "no_decay"
    assert any(p is model.net[1].weight for p in no_decay["params"])
    assert any(p is model.net[3].weight for p in no_decay["params"])


def test_mixin_learning_rate_monitor_keys(tmp_path):
    """Test that LearningRateMonitor names its keys after our groups."""
    lr_monitor = LearningRateMonitor()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=CSVLogger(tmp_path), callbacks=[lr_monitor]))
    trainer.fit(NoDecayBoringModel())
    assert list(lr_monitor.lrs) == ["lr-AdamW/decay", "lr-AdamW/no_decay"]
    with open(trainer.logger.experiment.metrics_file_path) as f:
        header = next(csv.reader(f))
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay"} <= set(header)


def test_mixin_lr_scheduler_callable(tmp_path):
    """Test that `self.lr_scheduler` is built on the optimizer and stepped per `lr_scheduler_config`."""
    model = NoDecayBoringModel()
    model.lr_scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model.lr_scheduler_config = {"interval": "step"}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(model)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.01 * 0.5**3] * 2


def test_mixin_configure_optimizers_is_idempotent(tmp_path):
    """Test that `lr_find` and two fits in a row work and build the same groups each time."""
    model = NoDecayBoringModel()
    first, second = model.configure_optimizers(), model.configure_optimizers()
    assert [g["params"] for g in first.param_groups] == [g["params"] for g in second.param_groups]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    Tuner(trainer).lr_find(model, num_training=4, update_attr=False)
    trainer.fit(model)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2)).fit(model)
    assert [g["name"] for g in model.trainer.optimizers[0].param_groups] == ["decay", "no_decay"]


def test_mixin_per_instance_declarations():
    """Test that declarations set on an instance replace the class defaults for that instance only."""
    model = NoDecayBoringModel()
    model.no_decay_param_names = (*DEFAULT_NO_DECAY_PARAM_NAMES, "layer.weight")
    optimizer = model.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["no_decay"]
    assert [g["name"] for g in NoDecayBoringModel().configure_optimizers().param_groups] == ["decay", "no_decay"]


def test_mixin_resolves_multipliers_from_the_optimizer():
    """Test that a multiplier group gets multiplier x the optimizer's `weight_decay` at build time."""

    class Net(NoDecayBoringModel):
        weight_decay_multipliers = {"layer.weight": 3.0}  # noqa: RUF012

    optimizer = Net().configure_optimizers()
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("no_decay", 0.0),
        ("decay_x3", pytest.approx(0.3)),
    ]


def test_mixin_overridden_param_groups_with_a_foreign_parameter_raise():
    """Test that an overridden `configure_param_groups` holding a parameter of no module is refused."""

    class Net(NoDecayBoringModel):
        def configure_param_groups(self):
            return [{"params": [*self.parameters(), nn.Parameter(torch.ones(1))]}]

    with pytest.raises(ValueError, match=r"puts a parameter in group `pg1` that is frozen or not part of the model"):
        Net().configure_optimizers()


class Ruled(TwoLayerModel):
    weight_decay_multipliers = {"head.weight": 2.0}  # noqa: RUF012


class ByHand(TwoLayerModel):
    weight_decay_multipliers = {"head.weight": 2.0}  # noqa: RUF012  (the rules its hand-built groups follow)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [self.body.weight]},
            {"params": [self.body.bias, self.head.bias], "weight_decay": 0.0},
            {"params": [self.head.weight], "weight_decay": 2 * 0.5},
        ]
        return self.optimizer(groups)


@pytest.mark.parametrize("optimizer", FIT_OPTIMIZERS.values(), ids=FIT_OPTIMIZERS)
def test_multipliers_mixin_rule_equals_hand_built_group_in_trainer_fit(tmp_path, optimizer):
    """Test that through a real Trainer fit a 2.0 rule equals a hand-built group with twice the decay."""
    kwargs = trainer_kwargs(tmp_path, max_steps=5, precision="64-true")
    ruled, by_hand = Ruled(optimizer), ByHand(optimizer)
    pl.Trainer(**kwargs).fit(ruled)
    pl.Trainer(**kwargs).fit(by_hand)
    groups = ruled.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.5), ("no_decay", 0.0), ("decay_x2", 1.0)]
    assert_all_close(ruled, by_hand)


def test_multipliers_follow_cli_weight_decay(tmp_path):
    """Test that `--model.optimizer.weight_decay` from LightningCLI scales the multiplier groups."""
    args = ["--model.optimizer=SGD", "--model.optimizer.lr=0.1", "--model.optimizer.weight_decay=0.3"]
    cli = run_cli(Ruled, tmp_path, *args, max_steps=1)
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.3), ("no_decay", 0.0), ("decay_x2", 0.6)]


class HandWrittenOptimizer(ZeroGradModel):
    """A mixin user who wrote `AdamW(self.parameters())` anyway, with a scheduler."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, weight_decay=0.2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_mixin_safety_net_splits_hand_written_optimizer(tmp_path, nodecay_log):
    """Test that excluded parameters are moved out of a decayed group before the first step, with a log line."""
    model = HandWrittenOptimizer()
    weight, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(model)
    groups = trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.2), ("no_decay", 0.0)]
    # the new group follows the schedule too
    assert [g["lr"] for g in groups] == [0.5 * 0.5**3] * 2
    torch.testing.assert_close(model.layer.bias.detach(), bias)
    torch.testing.assert_close(
        model.layer.weight.detach(), weight * (1 - 0.5 * 0.2) * (1 - 0.25 * 0.2) * (1 - 0.125 * 0.2)
    )
    split_lines = log_lines(nodecay_log, "safety net")
    assert split_lines == [
        "NoDecayMixin safety net: SGD group `pg1`: moved 1 excluded tensor (layer.bias) to new group `no_decay`"
        " with weight_decay=0.0."
    ]


def test_mixin_safety_net_resume(tmp_path):
    """Test that a run whose groups were split resumes from its checkpoint with matching optimizer state."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint]))
    trainer.fit(HandWrittenOptimizer())
    model = HandWrittenOptimizer()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, enable_checkpointing=True))
    trainer.fit(model, ckpt_path=checkpoint.last_model_path)
    assert trainer.global_step == 4
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["decay", "no_decay"]


def test_mixin_safety_net_leaves_correct_optimizers_alone(tmp_path, nodecay_log):
    """Test that an optimizer built by the mixin is not touched and no split is logged."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(NoDecayBoringModel())
    assert not log_lines(nodecay_log, "safety net")
    assert len(trainer.optimizers[0].param_groups) == 2


def test_mixin_summary_logged_once_at_fit_start(tmp_path, nodecay_log):
    """Test that the group summary is logged once per fit, and can be switched off."""
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2)).fit(NoDecayBoringModel())
    summaries = log_lines(nodecay_log, "Weight decay groups")
    assert len(summaries) == 1
    assert "decay    | x1    | 0.1          | 1       | 64" in summaries[0]
    assert "name pattern `bias`: 1 tensor (layer.bias)" in summaries[0]
    nodecay_log.clear()
    model = NoDecayBoringModel()
    model.log_weight_decay_summary = False
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(model)
    assert not log_lines(nodecay_log, "Weight decay groups")


def test_mixin_summary_as_data():
    """Test that the summary is available as data for notebooks and tests."""
    summary = NoDecayBoringModel().weight_decay_summary()
    assert [(g.name, g.tensors, g.elements) for g in summary.groups] == [("decay", 1, 64), ("no_decay", 1, 2)]
    assert summary.reasons == {"name pattern `bias`": ["layer.bias"]}


def test_mixin_user_on_fit_start_chain_kept(tmp_path):
    """Test that the mixin calls the LightningModule's `on_fit_start` chain (user hooks still run)."""
    calls = []

    class Net(NoDecayBoringModel):
        def on_fit_start(self):
            calls.append("user")
            super().on_fit_start()

    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(Net())
    assert calls == ["user"]


def test_mixin_with_lightning_namespace(tmp_path):
    """Test that the same mixin works in a `lightning.pytorch` LightningModule and Trainer."""
    lightning = pytest.importorskip("lightning")
    model = lightning_pytorch_model()
    trainer = lightning.pytorch.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model)
    assert group_names(trainer.optimizers[0], model) == {
        "decay": ["backbone.0.weight", "head.weight"],
        "no_decay": ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "head.bias"],
    }


def test_boring_model_without_mixin_untouched(tmp_path):
    """Test the control: a plain LightningModule keeps its single decayed group."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(BoringModel())
    assert len(trainer.optimizers[0].param_groups) == 1
