import functools

import pytest
import pytorch_lightning as pl
import torch
from fits import log_lines, trainer_kwargs
from models import RandomDataset, lightning_pytorch_model
from oracles import assert_same_training, group_names
from pytorch_lightning.callbacks import BackboneFinetuning, BaseFinetuning, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import (
    DEFAULT_NO_DECAY_PARAM_NAMES,
    NoDecayBackboneFinetuning,
    NoDecayFinetuning,
    NoDecayMixin,
    unfreeze_and_add_param_groups,
)
from lightning_nodecay._layout import Layout, layout_of
from lightning_nodecay._schema import LAYOUTS

BACKBONE_DECAY = ["backbone.0.weight", "backbone.3.weight"]
BACKBONE_NO_DECAY = ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.2.weight", "backbone.3.bias"]


class Plain(pl.LightningModule):
    """A backbone and a head that both hold a fresh `LayerNorm(8)` and a zero-initialised bias of 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.PReLU(), nn.Linear(8, 8))
        self.head = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        nn.init.zeros_(self.backbone[3].bias)
        nn.init.zeros_(self.head[0].bias)

    def training_step(self, batch, batch_idx):
        return self.head(self.backbone(batch)).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(RandomDataset(8, 4), batch_size=4)  # one step per epoch

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)


class Model(NoDecayMixin, Plain):
    def __init__(self):
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)


def frozen_backbone(model):
    model.backbone.requires_grad_(False)
    return model, model.configure_optimizers()


def assert_each_trainable_parameter_once(optimizer, model):
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(set(in_optimizer))
    assert set(in_optimizer) == {id(p) for p in model.parameters() if p.requires_grad}


def test_lightning_unfreeze_skips_parameters_equal_in_value_control():
    """Test the bug: Lightning deduplicates by value, so a fresh LayerNorm and a zero bias are never added."""
    model, optimizer = frozen_backbone(Model())
    with pytest.warns(UserWarning, match="already exist within another group"):
        BaseFinetuning.unfreeze_and_add_param_group(model.backbone, optimizer, lr=1e-3)
    added = {id(p) for p in optimizer.param_groups[-1]["params"]}
    skipped = [n for n, p in model.backbone.named_parameters() if id(p) not in added]
    assert skipped == ["1.weight", "1.bias", "3.bias"]
    assert optimizer.param_groups[-1]["weight_decay"] == 0.1  # and the biases it did add are decayed


def test_unfreeze_and_add_param_groups_splits_and_keeps_every_parameter():
    """Test that unfrozen parameters go to `backbone_decay` / `backbone_no_decay`, all of them, by identity."""
    model, optimizer = frozen_backbone(Model())
    added = unfreeze_and_add_param_groups(model, model.backbone, optimizer, lr=1e-3)
    assert [g["name"] for g in added] == ["backbone_decay", "backbone_no_decay"]
    groups = group_names(optimizer, model)
    assert groups["backbone_decay"] == BACKBONE_DECAY
    assert groups["backbone_no_decay"] == BACKBONE_NO_DECAY
    assert [(g["name"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups[2:]] == [
        ("backbone_decay", 0.1, 1e-3),
        ("backbone_no_decay", 0.0, 1e-3),
    ]
    assert_each_trainable_parameter_once(optimizer, model)


def test_unfreeze_and_add_param_groups_twice_adds_nothing():
    """Test that parameters already in the optimizer (same object) are left alone, tied ones included."""
    model = Model()
    model.head[2].weight = nn.Parameter(torch.randn(2, 8))
    model.backbone.add_module("tied", nn.Linear(8, 2))
    model.backbone.tied.weight = model.head[2].weight  # in the head's group already
    model, optimizer = frozen_backbone(model)
    model.head[2].weight.requires_grad_(True)
    optimizer = model.configure_optimizers()
    unfreeze_and_add_param_groups(model, model.backbone, optimizer)
    assert unfreeze_and_add_param_groups(model, model.backbone, optimizer) == []
    assert_each_trainable_parameter_once(optimizer, model)
    assert len(optimizer.param_groups) == 4


def test_unfreeze_and_add_param_groups_default_lr_and_name():
    """Test Lightning's lr semantics (first group's lr / `initial_denom_lr`) and derived, unique group names."""
    model, optimizer = frozen_backbone(Model())
    model.backbone[3].requires_grad_(False)
    unfreeze_and_add_param_groups(model, model.backbone[:3], optimizer, initial_denom_lr=4.0)
    unfreeze_and_add_param_groups(model, [model.backbone[3]], optimizer)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups[2:]] == [
        ("unfrozen_decay", 0.0025),
        ("unfrozen_no_decay", 0.0025),
        ("unfrozen_2_decay", 0.001),
        ("unfrozen_2_no_decay", 0.001),
    ]


def test_unfreeze_and_add_param_groups_follows_the_model_declarations():
    """Test that the mixin's patterns (full names) and multipliers decide the new groups."""
    model = Model()
    model.no_decay_param_names = (*DEFAULT_NO_DECAY_PARAM_NAMES, "backbone.0.weight")
    model.weight_decay_multipliers = {"backbone.3.weight": 2.0}
    model, optimizer = frozen_backbone(model)
    unfreeze_and_add_param_groups(model, model.backbone, optimizer, lr=1e-3)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone_decay_x2"]["weight_decay"] == pytest.approx(0.2)
    assert group_names(optimizer, model)["backbone_decay_x2"] == ["backbone.3.weight"]
    assert group_names(optimizer, model)["backbone_no_decay"] == ["backbone.0.weight", *BACKBONE_NO_DECAY]
    assert "backbone_decay" not in groups


def test_unfreeze_and_add_param_groups_plain_module_uses_defaults():
    """Test that a LightningModule without the mixin gets the default rules."""
    model = Plain()
    model.backbone.requires_grad_(False)
    optimizer = model.configure_optimizers()
    unfreeze_and_add_param_groups(model, model.backbone, optimizer, lr=1e-3)
    assert group_names(optimizer, model)["backbone_no_decay"] == BACKBONE_NO_DECAY


def test_unfreeze_and_add_param_groups_train_bn_false_leaves_batchnorm_out():
    """Test Lightning's `train_bn=False`: BatchNorm parameters are not added."""
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).requires_grad_(False)
    model.head = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.head.parameters(), weight_decay=0.1)
    unfreeze_and_add_param_groups(model, model.backbone, optimizer, lr=1e-3, train_bn=False)
    assert group_names(optimizer, model) == {
        None: ["head.weight", "head.bias"],
        "backbone_decay": ["backbone.0.weight"],
        "backbone_no_decay": ["backbone.0.bias"],
    }


def test_no_decay_finetuning_filter_on_optimizer_by_identity():
    """Test that `filter_on_optimizer` drops only the parameters the optimizer holds, not ones equal in value."""
    model, optimizer = frozen_backbone(Model())
    fresh_norm, head_norm = model.backbone[1].weight, model.head[1].weight  # both all ones
    assert torch.equal(fresh_norm, head_norm)
    kept = NoDecayFinetuning.filter_on_optimizer(optimizer, [head_norm, fresh_norm])
    assert [id(p) for p in kept] == [id(fresh_norm)]


def fit(tmp_path, model, callback, max_epochs, ckpt_path=None, checkpoint=True):
    callbacks = [callback] + (
        [ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)] if checkpoint else []
    )
    kwargs = trainer_kwargs(
        tmp_path, max_steps=-1, max_epochs=max_epochs, enable_checkpointing=checkpoint, callbacks=callbacks
    )
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def test_backbone_finetuning_run_keeps_the_split(tmp_path):
    """Test a `NoDecayBackboneFinetuning` fit: backbone split by rules, nothing twice, both groups on the schedule."""
    model = Model()
    trainer = fit(tmp_path, model, NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1), max_epochs=4)
    optimizer = trainer.optimizers[0]
    groups = group_names(optimizer, model)
    assert list(groups) == ["decay", "no_decay", "backbone_decay", "backbone_no_decay"]
    assert groups["backbone_decay"] == BACKBONE_DECAY
    assert groups["backbone_no_decay"] == BACKBONE_NO_DECAY
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert_each_trainable_parameter_once(optimizer, model)
    # BackboneFinetuning's schedule: lr * 0.1 at the unfreeze epoch, then x2 per epoch (below the head's 0.01)
    assert [g["lr"] for g in optimizer.param_groups[2:]] == [pytest.approx(0.001 * 2**2)] * 2


def test_backbone_finetuning_trains_what_lightning_skips(tmp_path):
    """Test that a backbone LayerNorm equal in value to the head's is trained by ours and skipped by Lightning's."""
    lightning_model = Plain()
    with pytest.warns(UserWarning, match="already exist within another group"):
        fit(tmp_path / "a", lightning_model, BackboneFinetuning(unfreeze_backbone_at_epoch=0), 2, checkpoint=False)
    ours = Plain()
    fit(tmp_path / "b", ours, NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=0), 2, checkpoint=False)
    assert torch.equal(lightning_model.backbone[1].weight, torch.ones(8))  # never trained
    assert torch.equal(lightning_model.backbone[3].bias, torch.zeros(8))
    assert not torch.equal(ours.backbone[1].weight, torch.ones(8))
    assert not torch.equal(ours.backbone[3].bias, torch.zeros(8))


def test_lightning_backbone_finetuning_with_the_mixin_is_refused(tmp_path):
    """Test that Lightning's callback adding decayed biases is refused at the unfreeze, before they are stepped."""
    model = Model()
    backbone = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    with pytest.raises(ValueError, match=r"`backbone.0.bias`, .*NoDecayBackboneFinetuning"):
        fit(tmp_path, model, BackboneFinetuning(unfreeze_backbone_at_epoch=1), 3, checkpoint=False)
    for name, param in model.backbone.named_parameters():
        assert torch.equal(param, backbone[name]), name


@pytest.mark.parametrize("checkpoint_epoch", [0, 2])
def test_backbone_finetuning_resume_matches_uninterrupted_run(tmp_path, nodecay_log, checkpoint_epoch):
    """Test resuming before or after the unfreeze: same groups, bit-identical state and weights, layout accepted."""
    uninterrupted = Model()
    trainer = fit(tmp_path / "a", uninterrupted, NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1), 4)
    resumed = Model()
    ckpt_path = tmp_path / "a" / f"epoch={checkpoint_epoch}-step={checkpoint_epoch + 1}.ckpt"
    callback = NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1)
    resumed_trainer = fit(tmp_path / "b", resumed, callback, 4, ckpt_path=ckpt_path, checkpoint=False)
    assert group_names(resumed_trainer.optimizers[0], resumed) == group_names(trainer.optimizers[0], uninterrupted)
    assert_same_training(resumed_trainer, resumed, trainer, uninterrupted)
    assert not log_lines(nodecay_log, "NoDecayMixin resume")
    saved = Layout.from_state(torch.load(ckpt_path, weights_only=True)[LAYOUTS][0])  # what the check compared
    final = layout_of(resumed_trainer.optimizers[0].param_groups, resumed)
    assert final.groups[: len(saved.groups)] == saved.groups


def test_lightning_backbone_finetuning_resume_leaves_backbone_frozen_control(tmp_path):
    """Test the Lightning bug `NoDecayFinetuning` fixes: after resuming past the unfreeze the backbone stays frozen."""
    fit(tmp_path / "a", Plain(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), 3)
    checkpoint = torch.load(tmp_path / "a" / "epoch=1-step=2.ckpt", weights_only=True)
    resumed = Plain()
    fit(
        tmp_path / "b",
        resumed,
        BackboneFinetuning(unfreeze_backbone_at_epoch=1),
        3,
        tmp_path / "a" / "epoch=1-step=2.ckpt",
        False,
    )
    assert torch.equal(resumed.backbone[0].weight, checkpoint["state_dict"]["backbone.0.weight"])  # not trained
    assert not resumed.backbone[0].weight.requires_grad


def test_no_decay_finetuning_subclass_drop_in(tmp_path):
    """Test that a `BaseFinetuning`-style subclass calling `self.unfreeze_and_add_param_group` gets split groups."""

    class UnfreezeBackbone(NoDecayFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.backbone)

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=1e-3)

    model = Model()
    trainer = fit(tmp_path, model, UnfreezeBackbone(), 2, checkpoint=False)
    groups = group_names(trainer.optimizers[0], model)
    assert groups["backbone_no_decay"] == BACKBONE_NO_DECAY
    assert_each_trainable_parameter_once(trainer.optimizers[0], model)


def test_backbone_finetuning_with_lightning_namespace(tmp_path):
    """Test that the same callback works with a `lightning.pytorch` Trainer and LightningModule."""
    lightning = pytest.importorskip("lightning")
    model = lightning_pytorch_model()
    kwargs = trainer_kwargs(tmp_path, max_steps=-1, max_epochs=2, callbacks=[NoDecayBackboneFinetuning(1)])
    trainer = lightning.pytorch.Trainer(**kwargs)
    trainer.fit(model)
    assert group_names(trainer.optimizers[0], model) == {
        "decay": ["head.weight"],
        "no_decay": ["head.bias"],
        "backbone_decay": ["backbone.0.weight"],
        "backbone_no_decay": ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias"],
    }
