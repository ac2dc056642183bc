"""The fit lifecycle lives in a callback the mixin brings: a user's own hooks cannot switch it off."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from models import BackboneHeadNet
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import GroupRules, NoDecayMixin, decide
from lightning_nodecay._lifecycle import FitLifecycle
from lightning_nodecay._schema import LAYOUTS
from lightning_nodecay.rules import DEFAULT_NO_DECAY_MODULE_TYPES

Net = BackboneHeadNet


class BuiltElsewhere(Net):
    """The optimizer is built outside the mixin, with one decayed group: only the safety net can split it."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


def fit(tmp_path, model: pl.LightningModule, ckpt_path: str | None = None, **overrides) -> pl.Trainer:
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = pl.Trainer(**{**kwargs, **overrides})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def names_by_group(trainer: pl.Trainer, model: nn.Module) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in trainer.optimizers[0].param_groups}


def test_lifecycle_without_super_on_fit_start_still_splits(tmp_path, nodecay_log):
    """Test that a module's `on_fit_start` without `super()` does not switch off the safety net or the summary."""

    class Model(BuiltElsewhere):
        def on_fit_start(self) -> None:
            self.started = True

    model = Model()
    trainer = fit(tmp_path, model)
    assert model.started
    assert names_by_group(trainer, model)["no_decay"] == [
        "backbone.0.bias",
        "backbone.1.weight",
        "backbone.1.bias",
        "head.bias",
    ]
    assert any("Weight decay groups of `Model`" in r.getMessage() for r in nodecay_log.records)


class ExcludedIntoDecay(pl.Callback):
    """At epoch 1, adds the LayerNorm's parameters (excluded) to a new group with the optimizer's weight decay."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            optimizer = trainer.optimizers[0]
            norm = list(pl_module.backbone[1].parameters())
            kept = [p for p in optimizer.param_groups[1]["params"] if all(p is not q for q in norm)]
            optimizer.param_groups[1]["params"] = kept
            optimizer.add_param_group({"params": norm, "name": "late", "weight_decay": 0.1})


def test_lifecycle_without_super_on_train_epoch_start_still_checks(tmp_path):
    """Test that a module's `on_train_epoch_start` without `super()` does not switch off the checks of later changes."""

    class Model(Net):
        def on_train_epoch_start(self) -> None:
            self.epochs = getattr(self, "epochs", 0) + 1

    with pytest.raises(
        ValueError, match=r"`late` of `AdamW` \(`backbone.1.weight`, `backbone.1.bias`\) holds parameters excluded"
    ):
        fit(tmp_path, Model(), max_steps=-1, max_epochs=3, callbacks=[ExcludedIntoDecay()])


def test_lifecycle_without_super_on_save_checkpoint_still_records_layout(tmp_path):
    """Test that a module's `on_save_checkpoint` without `super()` does not drop the layout from checkpoints."""

    class Model(Net):
        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["mine"] = 1

    fit(tmp_path, Model(), enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    checkpoint = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=True)
    assert checkpoint["mine"] == 1
    assert [g["name"] for g in checkpoint[LAYOUTS][0]] == ["decay", "no_decay"]


def test_lifecycle_without_super_on_load_checkpoint_still_remaps(tmp_path, nodecay_log):
    """Test that a module's `on_load_checkpoint` without `super()` does not switch off the resume check."""
    fit(tmp_path, Net(), enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    path = next(tmp_path.glob("*.ckpt"))

    class Changed(Net):
        no_decay_module_types = (nn.Linear,)  # every parameter excluded: the groups changed

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self.loaded = True

    class Refused(Changed):
        on_layout_change = "error"

    model = Changed()
    fit(tmp_path, model, max_steps=3, ckpt_path=str(path))
    assert model.loaded
    assert any("NoDecayMixin resume: param groups changed" in r.getMessage() for r in nodecay_log.records)
    with pytest.raises(Exception, match="The param groups differ from the checkpoint's"):
        fit(tmp_path, Refused(), max_steps=3, ckpt_path=str(path))


def test_lifecycle_kept_when_configure_callbacks_overridden_without_super(tmp_path):
    """Test that a module's own `configure_callbacks` without `super()` still brings the lifecycle callback."""

    class Model(BuiltElsewhere):
        def configure_callbacks(self) -> list:
            return [pl.callbacks.LearningRateMonitor()]

    model = Model()
    trainer = fit(tmp_path, model, logger=pl.loggers.CSVLogger(tmp_path))
    assert sum(isinstance(c, FitLifecycle) for c in trainer.callbacks) == 1
    assert "no_decay" in names_by_group(trainer, model)


def test_lifecycle_keeps_no_state_on_the_module(tmp_path):
    """Test that a fit leaves no library state on the user's module: it lives in the callback."""
    model = BuiltElsewhere()
    before = set(vars(model))
    trainer = fit(tmp_path, model)
    added = set(vars(model)) - before
    assert not [name for name in added if "nodecay" in name.lower() or "decision" in name]
    assert sum(isinstance(c, FitLifecycle) for c in trainer.callbacks) == 1


class Counting:
    """A module rule that counts the modules it is asked about: every pass of `decide` asks the same number."""

    def __init__(self) -> None:
        self.calls = 0
        self.__name__ = "counting"

    def __call__(self, module: nn.Module) -> bool:
        self.calls += 1
        return False


def test_lifecycle_decides_once_per_fit(tmp_path):
    """Test that the decisions are computed once per fit, however many times the fit needs them."""
    counting = Counting()

    class Model(BuiltElsewhere):
        group_rules = GroupRules(no_decay_module_types=(*DEFAULT_NO_DECAY_MODULE_TYPES, counting))

    model = Model()
    decide(model, model.group_rules)
    per_pass, counting.calls = counting.calls, 0
    fit(tmp_path, model, max_steps=-1, max_epochs=3)
    assert per_pass > 0
    assert counting.calls == per_pass


def test_lifecycle_decides_again_when_unfreezing(tmp_path):
    """Test that the decisions are recomputed when the trainable parameters change (unfreezing), and only then."""
    from lightning_nodecay import NoDecayBackboneFinetuning

    counting = Counting()

    class Model(Net):
        group_rules = GroupRules(no_decay_module_types=(*DEFAULT_NO_DECAY_MODULE_TYPES, counting))

    model = Model()
    head_only = Model()
    head_only.backbone.requires_grad_(False)
    decide(head_only, head_only.group_rules)
    frozen_pass, counting.calls = counting.calls, 0
    decide(model, model.group_rules)
    full_pass, counting.calls = counting.calls, 0
    finetuning = NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer = fit(tmp_path, model, max_steps=-1, max_epochs=3, callbacks=[finetuning])
    assert counting.calls == frozen_pass + full_pass  # once with the backbone frozen, once after unfreezing
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == [
        "decay",
        "no_decay",
        "backbone_decay",
        "backbone_no_decay",
    ]


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_lifecycle_accepted_by_both_namespaces(tmp_path, namespace):
    """Test that the lifecycle callback and the monitor run under the Trainer of either Lightning namespace."""
    module = pytest.importorskip(namespace)
    from lightning_nodecay import WeightNormMonitor

    class Model(NoDecayMixin, module.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).pow(2).mean()

        def train_dataloader(self) -> DataLoader:
            return DataLoader(torch.randn(8, 4), batch_size=4)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.1)

    model = Model()
    trainer = module.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        logger=module.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        callbacks=[WeightNormMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model)
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["decay", "no_decay"]
    assert "weight_2.0_norm/no_decay" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
