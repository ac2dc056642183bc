import functools

import pytest
import torch
from fits import fit_with_checkpoints, log_lines, state_at_train_start, trainer_kwargs
from models import LayerNormNet, NoDecayLayerNormNet, lightning_pytorch_model
from oracles import assert_same_state, assert_same_training, state_by_name

from lightning_nodecay import DEFAULT_NO_DECAY_PARAM_NAMES, LayoutMismatchError
from lightning_nodecay._schema import LAYOUTS

LR, GAMMA = 0.01, 0.9  # the models' learning rate, and the schedule's factor per step


class ResumeModel(NoDecayLayerNormNet):
    """AdamW(lr=LR, weight_decay=0.1) and a StepLR stepped every step."""

    lr_scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=GAMMA)
    lr_scheduler_config = {"interval": "step"}  # noqa: RUF012


def test_resume_identical_code_matches_uninterrupted_run(tmp_path, nodecay_log):
    """Test that resuming mid-run with the same code gives bit-identical optimizer state and weights."""
    uninterrupted = ResumeModel()
    trainer = fit_with_checkpoints(tmp_path / "a", uninterrupted, max_steps=6)
    resumed = ResumeModel()
    resumed_trainer = fit_with_checkpoints(
        tmp_path / "b", resumed, max_steps=6, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt"
    )
    assert resumed_trainer.global_step == 6
    assert_same_training(resumed_trainer, resumed, trainer, uninterrupted)
    assert [g["lr"] for g in resumed_trainer.optimizers[0].param_groups] == [
        g["lr"] for g in trainer.optimizers[0].param_groups
    ]
    assert log_lines(nodecay_log, "NoDecayMixin resume") == []


def test_resume_checkpoint_records_the_layout_after_the_safety_net(tmp_path):
    """Test that the checkpoint holds the layout the optimizer really had, safety-net split included."""

    class HandWritten(ResumeModel):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.1)

    fit_with_checkpoints(tmp_path, HandWritten(), max_steps=2)
    checkpoint = torch.load(tmp_path / "epoch=1-step=2.ckpt", weights_only=True)
    assert checkpoint[LAYOUTS] == [  # one layout per optimizer
        [
            {"name": "decay", "params": ["net.0.weight", "net.2.weight"]},
            {"name": "no_decay", "params": ["net.0.bias", "net.1.weight", "net.1.bias", "net.2.bias"]},
        ]
    ]


@pytest.mark.parametrize(
    ("declarations", "groups", "moved"),
    [
        (
            {"no_decay_param_names": (*DEFAULT_NO_DECAY_PARAM_NAMES, "net.0.weight")},
            [
                ("decay", ["net.2.weight"]),
                ("no_decay", ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias", "net.2.bias"]),
            ],
            "`net.0.weight`: `decay` -> `no_decay`",
        ),
        (
            {"weight_decay_multipliers": {"net.2.weight": 2.0}},
            [
                ("decay", ["net.0.weight"]),
                ("no_decay", ["net.0.bias", "net.1.weight", "net.1.bias", "net.2.bias"]),
                ("decay_x2", ["net.2.weight"]),
            ],
            "`net.2.weight`: `decay` -> `decay_x2`",
        ),
    ],
)
def test_resume_changed_exclusions_remap_state_by_name(tmp_path, nodecay_log, declarations, groups, moved):
    """Test that a changed grouping gets each parameter's own saved state, logs the move, and trains on."""
    saving = ResumeModel()
    saving_trainer = fit_with_checkpoints(tmp_path / "a", saving, max_steps=4)
    saved = state_by_name(saving_trainer.optimizers[0], saving)

    resumed = ResumeModel(**declarations)
    probe = state_at_train_start()
    trainer = fit_with_checkpoints(
        tmp_path / "b", resumed, max_steps=6, ckpt_path=tmp_path / "a" / "epoch=3-step=4.ckpt", callbacks=[probe]
    )

    assert_same_state(probe.state, saved)
    names = {id(p): n for n, p in resumed.named_parameters()}
    assert [(g["name"], [names[id(p)] for p in g["params"]]) for g in trainer.optimizers[0].param_groups] == groups
    decayed_lr = LR * GAMMA**4
    assert [(name, lr) for name, lr, _ in probe.groups] == [(name, pytest.approx(decayed_lr)) for name, _ in groups]
    weight_decay = {"decay": 0.1, "no_decay": 0.0, "decay_x2": 0.2}
    assert [(name, wd) for name, _, wd in probe.groups] == [(n, pytest.approx(weight_decay[n])) for n, _ in groups]
    assert trainer.global_step == 6
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [pytest.approx(LR * GAMMA**6)] * len(groups)
    [line] = log_lines(nodecay_log, "NoDecayMixin resume")
    assert moved in line


def test_resume_new_and_dropped_parameters_reported(tmp_path, nodecay_log):
    """Test that a newly trainable parameter starts fresh and a newly frozen one's state is dropped, both logged."""
    saving = ResumeModel()
    saving.net[2].bias.requires_grad_(False)
    saving_trainer = fit_with_checkpoints(tmp_path / "a", saving, max_steps=2)
    saved = state_by_name(saving_trainer.optimizers[0], saving)

    resumed = ResumeModel()
    resumed.net[1].requires_grad_(False)
    probe = state_at_train_start()
    fit_with_checkpoints(
        tmp_path / "b", resumed, max_steps=3, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt", callbacks=[probe]
    )

    del saved["net.1.weight"], saved["net.1.bias"]
    assert "net.2.bias" not in probe.state
    probe.state.pop("net.2.bias", None)
    assert_same_state(probe.state, saved)
    [line] = log_lines(nodecay_log, "NoDecayMixin resume")
    assert "`net.2.bias`: new in `no_decay`, starts with fresh state" in line
    assert "`net.1.weight`: no longer in any group (was in `no_decay`), its state is dropped" in line


def test_resume_changed_exclusions_error_policy(tmp_path):
    """Test that `on_layout_change = "error"` refuses the resume before any step, listing the move and the fixes."""
    fit_with_checkpoints(tmp_path / "a", ResumeModel(), max_steps=2)
    checkpoint = torch.load(tmp_path / "a" / "epoch=1-step=2.ckpt", weights_only=True)
    resumed = ResumeModel(
        on_layout_change="error", no_decay_param_names=(*DEFAULT_NO_DECAY_PARAM_NAMES, "net.0.weight")
    )
    with pytest.raises(
        LayoutMismatchError,
        match=r"(?s)differ from the checkpoint's.*`net.0.weight`: `decay` -> `no_decay`.*on_layout_change = 'remap'",
    ):
        fit_with_checkpoints(tmp_path / "b", resumed, max_steps=4, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt")
    for name, param in resumed.named_parameters():  # restored, never stepped
        assert torch.equal(param, checkpoint["state_dict"][name]), name


def test_resume_error_policy_accepts_an_unchanged_layout(tmp_path):
    """Test that `error` does not get in the way when nothing changed."""
    fit_with_checkpoints(tmp_path / "a", ResumeModel(), max_steps=2)
    trainer = fit_with_checkpoints(
        tmp_path / "b", ResumeModel(on_layout_change="error"), 3, tmp_path / "a" / "epoch=1-step=2.ckpt"
    )
    assert trainer.global_step == 3


class PlainTwoGroups(LayerNormNet):
    """A LightningModule without the mixin whose hand-written groups happen to match the mixin's."""

    def configure_optimizers(self):
        decay = [self.net[0].weight, self.net[2].weight]
        rest = [p for p in self.parameters() if all(p is not d for d in decay)]
        return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=LR, weight_decay=0.1)


class PlainOneGroup(LayerNormNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.1)


def test_resume_plain_checkpoint_with_matching_groups_warns(tmp_path):
    """Test that a checkpoint saved without the mixin loads, with a warning that it cannot be checked."""
    fit_with_checkpoints(tmp_path / "a", PlainTwoGroups(), max_steps=2)
    model = ResumeModel()
    model.lr_scheduler = None
    with pytest.warns(UserWarning, match=r"no param-group layout \(it was saved without `NoDecayMixin`\)"):
        trainer = fit_with_checkpoints(
            tmp_path / "b", model, max_steps=3, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt"
        )
    assert trainer.global_step == 3


def test_resume_plain_checkpoint_with_other_groups_raises(tmp_path):
    """Test that a plain single-group checkpoint cannot be forced onto the mixin's groups, with the way out."""
    fit_with_checkpoints(tmp_path / "a", PlainOneGroup(), max_steps=2)
    model = ResumeModel()
    model.lr_scheduler = None
    with pytest.raises(
        LayoutMismatchError, match=r"groups hold \[6\] parameters, the current groups `decay` \(2\), `no_decay` \(4\)"
    ):
        fit_with_checkpoints(tmp_path / "b", model, max_steps=3, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt")


def test_resume_user_checkpoint_hooks_still_run(tmp_path):
    """Test that user `on_save_checkpoint` / `on_load_checkpoint` overrides calling `super()` keep both working."""
    loaded = []

    class Hooked(ResumeModel):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["user"] = 42
            super().on_save_checkpoint(checkpoint)

        def on_load_checkpoint(self, checkpoint):
            loaded.append(checkpoint["user"])
            super().on_load_checkpoint(checkpoint)

    fit_with_checkpoints(tmp_path / "a", Hooked(), max_steps=2)
    checkpoint = torch.load(tmp_path / "a" / "epoch=1-step=2.ckpt", weights_only=True)
    assert checkpoint["user"] == 42
    assert LAYOUTS in checkpoint
    fit_with_checkpoints(tmp_path / "b", Hooked(), max_steps=3, ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt")
    assert loaded == [42]


def test_resume_load_from_checkpoint_for_inference_is_quiet(tmp_path, recwarn):
    """Test that `load_from_checkpoint` (no Trainer, no optimizer) neither checks nor warns."""
    fit_with_checkpoints(tmp_path / "a", PlainOneGroup(), max_steps=2)
    model = ResumeModel.load_from_checkpoint(tmp_path / "a" / "epoch=1-step=2.ckpt")
    assert not [w for w in recwarn if "param-group layout" in str(w.message)]
    assert "_nodecay_checkpoint" not in model.__dict__


def test_resume_remap_with_lightning_namespace(tmp_path, nodecay_log):
    """Test that the layout check and remap work the same with a `lightning.pytorch` Trainer and module."""
    lightning = pytest.importorskip("lightning")
    saving = lightning_pytorch_model()
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    saving_trainer = lightning.pytorch.Trainer(**kwargs)
    saving_trainer.fit(saving)
    saved = state_by_name(saving_trainer.optimizers[0], saving)
    resumed = lightning_pytorch_model(no_decay_param_names=("*",))  # the `decay` group goes away
    probe = state_at_train_start(lightning.pytorch)
    trainer = lightning.pytorch.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[probe]))
    trainer.fit(resumed, ckpt_path=checkpoint.last_model_path)
    assert_same_state(probe.state, saved)
    [line] = log_lines(nodecay_log, "NoDecayMixin resume")
    assert "groups `decay`, `no_decay` -> `no_decay`" in line
