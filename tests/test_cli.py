"""LightningCLI with the mixin: optimizer and scheduler from the command line, and the CLI's own `--optimizer` flag."""

import pytest
import pytorch_lightning as pl
import torch
from fits import log_lines, run_cli
from models import BoringModel, TwoLayerModel
from pytorch_lightning.cli import OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import GroupRules, NoDecayMixin

pytest.importorskip("jsonargparse")  # LightningCLI's parser


class PlainModel(NoDecayMixin, BoringModel):
    """A mixin model that leaves the optimizer to the CLI's own `--optimizer` flag."""

    configure_optimizers = BoringModel.configure_optimizers


def test_cli_optimizer_callable_weight_decay_reaches_decay_group_only(tmp_path):
    """Test that `--model.optimizer.weight_decay` from the command line reaches only the decay group."""
    cli = run_cli(
        TwoLayerModel,
        tmp_path,
        "--model.optimizer=AdamW",
        "--model.optimizer.lr=0.01",
        "--model.optimizer.weight_decay=0.3",
    )
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"], g["lr"]) for g in groups] == [("decay", 0.3, 0.01), ("no_decay", 0.0, 0.01)]


def test_cli_optimizer_callable_with_scheduler(tmp_path):
    """Test that `--model.lr_scheduler` is built on our groups."""
    cli = run_cli(
        TwoLayerModel,
        tmp_path,
        "--model.optimizer=SGD",
        "--model.optimizer.lr=0.1",
        "--model.optimizer.weight_decay=0.01",
        "--model.lr_scheduler=StepLR",
        "--model.lr_scheduler.step_size=1",
    )
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR)
    assert [g["name"] for g in config.scheduler.optimizer.param_groups] == ["decay", "no_decay"]


def test_cli_own_optimizer_flag_kept_in_check_by_safety_net(tmp_path, nodecay_log):
    """Test that the CLI's `--optimizer`, which replaces `configure_optimizers`, still gets the exclusions."""
    with pytest.warns(UserWarning, match="will be overridden by `LightningCLI.configure_optimizers`"):
        cli = run_cli(
            PlainModel,
            tmp_path,
            "--optimizer=AdamW",
            "--optimizer.lr=0.01",
            "--optimizer.weight_decay=0.3",
            "--lr_scheduler=ExponentialLR",
            "--lr_scheduler.gamma=0.5",
        )
    optimizer = cli.trainer.optimizers[0]
    assert [(g["name"], g["weight_decay"]) for g in optimizer.param_groups] == [("decay", 0.3), ("no_decay", 0.0)]
    assert optimizer.param_groups[1]["params"] == [cli.model.layer.bias]
    # ExponentialLR steps per epoch: still at the initial lr in both groups, and it knows about both groups
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [0.01, 0.01]
    assert log_lines(nodecay_log, "safety net: AdamW group `pg1`: moved 1 excluded tensor")


class RulesModel(NoDecayMixin, pl.LightningModule):
    """Rules, optimizer and scheduler all `__init__` arguments, as LightningCLI YAML declares them."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW, group_rules: GroupRules | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 2)
        self.optimizer = optimizer
        self.group_rules = group_rules

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.head(self.embedding(batch)).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(8).repeat(2), batch_size=4)


def test_cli_yaml_declares_group_rules(tmp_path):
    """Test that a YAML file declares exclusions by import path and multipliers, and they reach the groups."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  optimizer:\n"
        "    class_path: torch.optim.AdamW\n"
        "    init_args: {lr: 0.01, weight_decay: 0.2}\n"
        "  group_rules:\n"
        "    no_decay_module_types: [torch.nn.Embedding, lightning_nodecay.norm_by_class_name]\n"
        "    no_decay_param_names: [bias]\n"
        "    weight_decay_multipliers: {'head.weight': 3.0}\n"
    )
    cli = run_cli(RulesModel, tmp_path, f"--config={config}")
    groups = {g["name"]: (g["weight_decay"], len(g["params"])) for g in cli.trainer.optimizers[0].param_groups}
    assert groups == {"no_decay": (0.0, 2), "decay_x3": (pytest.approx(0.6), 1)}
    assert cli.model.configure_group_rules().no_decay_module_types[0] is nn.Embedding


def test_cli_yaml_declares_lr_multipliers(tmp_path):
    """Test that a YAML file declares learning-rate rules, and each group's lr follows them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  optimizer:\n"
        "    class_path: torch.optim.SGD\n"
        "    init_args: {lr: 0.1}\n"
        "  group_rules:\n"
        "    lr_multipliers: {torch.nn.Embedding: 0.5}\n"
    )
    cli = run_cli(RulesModel, tmp_path, f"--config={config}")
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs == {"decay": 0.1, "no_decay": 0.1, "decay_lr_x0.5": pytest.approx(0.05)}
