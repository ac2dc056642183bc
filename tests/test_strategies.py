import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, log_lines, state_at_train_start, trainer_kwargs
from models import NoDecayLayerNormNet
from oracles import assert_same_state, group_names, state_by_name
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch import nn

from lightning_nodecay import (
    DEFAULT_NO_DECAY_PARAM_NAMES,
    LayoutMismatchError,
    decide,
    param_groups,
    summarize,
)
from lightning_nodecay._layout import layout_of


def freeze_weights(model):
    model.net[0].weight.requires_grad_(False)
    model.net[2].weight.requires_grad_(False)


def freeze_excluded(model):
    for name, param in model.named_parameters():
        if name not in ("net.0.weight", "net.2.weight"):
            param.requires_grad_(False)


@pytest.mark.parametrize(
    ("freeze", "expected"),
    [
        (freeze_weights, {"no_decay": ["net.0.bias", "net.1.weight", "net.1.bias", "net.2.bias"]}),
        (freeze_excluded, {"decay": ["net.0.weight", "net.2.weight"]}),
    ],
)
def test_empty_groups_never_reach_the_optimizer(tmp_path, freeze, expected):
    """Test that a group emptied by freezing is left out (DeepSpeed ZeRO-1/2 crash on empty groups); training runs."""
    model = NoDecayLayerNormNet()
    freeze(model)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(model)
    assert group_names(trainer.optimizers[0], model) == expected
    assert trainer.global_step == 2


def test_configure_param_groups_generators_and_empty_groups(tmp_path):
    """Test that groups given as generators keep their parameters and empty groups are dropped."""

    class Custom(NoDecayLayerNormNet):
        def configure_param_groups(self):
            return [
                {"name": "first", "params": self.net[0].parameters()},
                {"name": "empty", "params": (p for p in self.net[1].parameters() if p.requires_grad)},
                {"name": "rest", "params": iter([self.net[2].weight, self.net[2].bias]), "weight_decay": 0.0},
            ]

    model = Custom()
    model.net[1].requires_grad_(False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model)
    groups = group_names(trainer.optimizers[0], model)
    assert groups == {
        "first": ["net.0.weight"],
        "first_no_decay": ["net.0.bias"],
        "rest": ["net.2.weight", "net.2.bias"],
    }


def test_group_emptied_by_freezing_on_resume_is_remapped(tmp_path, nodecay_log):
    """Test resuming with every decayed weight frozen: the `decay` group disappears, its state is dropped, logged."""
    fit_with_checkpoints(tmp_path, NoDecayLayerNormNet(), max_steps=2)
    model = NoDecayLayerNormNet()
    freeze_weights(model)
    trainer = fit_with_checkpoints(tmp_path, model, max_steps=3, ckpt_path=tmp_path / "epoch=1-step=2.ckpt")
    assert list(group_names(trainer.optimizers[0], model)) == ["no_decay"]
    assert trainer.global_step == 3
    [line] = log_lines(nodecay_log, "NoDecayMixin resume")
    assert "groups `decay`, `no_decay` -> `no_decay`" in line
    assert "`net.0.weight`: no longer in any group (was in `decay`), its state is dropped" in line


def zero3_stand_in(model):
    """Partition every parameter as DeepSpeed ZeRO-3 does: an empty tensor plus `ds_shape`, `ds_numel`, `ds_tensor`."""
    for module in model.modules():
        for name, param in [(n, p) for n, p in module._parameters.items() if p is not None]:
            empty = nn.Parameter(torch.empty(0), requires_grad=param.requires_grad)
            empty.ds_shape, empty.ds_numel = param.shape, param.numel()
            empty.ds_tensor = param.detach().flatten()[: (param.numel() + 1) // 2].clone()  # this rank's shard
            module._parameters[name] = empty
    return model


def test_zero3_parameters_classified_by_module_and_name():
    """Test that numel-0 ZeRO-3 parameters get the full model's decisions (no shape rule) and full sizes."""
    full = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Embedding(10, 8), nn.PReLU(), nn.Linear(8, 2, bias=False))
    expected = [(d.name, d.multiplier, d.reason) for d in decide(full)]
    sizes = {g.name: g.elements for g in summarize(decide(full)).groups}
    partitioned = zero3_stand_in(full)
    assert all(p.numel() == 0 and p.ndim == 1 for p in partitioned.parameters())
    assert [(d.name, d.multiplier, d.reason) for d in decide(partitioned)] == expected
    assert (
        {g.name: g.elements for g in summarize(decide(partitioned)).groups}
        == sizes
        == {
            "decay": 8 * 8 + 10 * 8 + 2 * 8,
            "no_decay": 8 + 8 + 8 + 1,
        }
    )
    groups = param_groups(partitioned)
    assert all(g["params"] for g in groups)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    assert [len(g.params) for g in layout_of(optimizer.param_groups, partitioned).groups] == [3, 4]


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores the checkpoint after setting up optimizers, in the order FSDP and DeepSpeed use."""

    @property
    def restore_checkpoint_after_setup(self):
        return True


class SelfRestoringStrategy(LateRestoreStrategy):
    """Like FSDP: Lightning does not load the optimizer state, the strategy would."""

    @property
    def lightning_restore_optimizer(self):
        return False


def test_late_restore_strategy_remaps_in_on_load_checkpoint(tmp_path):
    """Test the FSDP/DeepSpeed order (optimizers exist before the checkpoint is read): the state is remapped by name."""
    saving = NoDecayLayerNormNet()
    trainer = fit_with_checkpoints(tmp_path, saving, max_steps=2)
    saved = state_by_name(trainer.optimizers[0], saving)
    model = NoDecayLayerNormNet()
    model.no_decay_param_names = (*DEFAULT_NO_DECAY_PARAM_NAMES, "net.0.weight")
    probe = state_at_train_start()
    strategy = LateRestoreStrategy(device=torch.device("cpu"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, strategy=strategy, callbacks=[probe]))
    trainer.fit(model, ckpt_path=tmp_path / "epoch=1-step=2.ckpt")
    assert_same_state(probe.state, saved)
    assert group_names(trainer.optimizers[0], model)["decay"] == ["net.2.weight"]


def test_self_restoring_strategy_refuses_a_changed_layout(tmp_path):
    """Test that a changed layout is refused when the strategy restores optimizer state itself (cannot remap)."""
    fit_with_checkpoints(tmp_path, NoDecayLayerNormNet(), max_steps=2)
    model = NoDecayLayerNormNet()
    model.no_decay_param_names = (*DEFAULT_NO_DECAY_PARAM_NAMES, "net.0.weight")
    strategy = SelfRestoringStrategy(device=torch.device("cpu"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, strategy=strategy))
    with pytest.raises(
        LayoutMismatchError, match=r"(?s)`net.0.weight`: `decay` -> `no_decay`.*restores optimizer state"
    ):
        trainer.fit(model, ckpt_path=tmp_path / "epoch=1-step=2.ckpt")
