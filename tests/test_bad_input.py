"""The bad-input catalogue (README, "Bad-input catalogue"): each misuse raises or warns naming the culprit and the fix.

Rows tested elsewhere: resuming with a changed layout (`test_resume.py`), a checkpoint without layout
(`test_resume.py`), FSDP flat parameters (`test_properties.py`), Lightning's `BackboneFinetuning` with the
mixin (`test_finetuning.py`), a strategy that restores optimizer state itself (`test_strategies.py`).
"""

import functools
import re
from contextlib import nullcontext

import pytest
import pytorch_lightning as pl
import torch
from fits import log_lines, trainer_kwargs
from models import RandomDataset
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import (
    GroupRules,
    LayoutMismatchError,
    NoDecayBackboneFinetuning,
    NoDecayMixin,
    param_groups,
    unfreeze_and_add_param_groups,
)
from lightning_nodecay._checkpoint import resume_layouts, save_layouts


class Model(NoDecayMixin, pl.LightningModule):
    def __init__(self, **declarations):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        self.pos_embed = nn.Parameter(torch.zeros(4))
        self.optimizer = functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
        for name, value in declarations.items():
            setattr(self, name, value)

    def training_step(self, batch, batch_idx):
        return (self.net(batch + self.pos_embed)).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(RandomDataset(4, 4), batch_size=4)


class Declares(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(4))

    def no_weight_decay(self):
        return "pos_embed"


def net():
    return Model().net


def backbone_and_head():
    model = Model()
    model.net[0].requires_grad_(False)
    return model, torch.optim.AdamW(param_groups(model), weight_decay=0.1)


def unfreeze_with_rprop():
    model = Model()
    model.net[0].requires_grad_(False)
    unfreeze_and_add_param_groups(model, model.net[0], torch.optim.Rprop(model.net[2].parameters()))


def unfreeze_twice_with_one_name():
    model, optimizer = backbone_and_head()
    unfreeze_and_add_param_groups(model, model.net[0], optimizer, name="backbone")
    model.net[1].requires_grad_(False)
    optimizer.param_groups = [g for g in optimizer.param_groups if g["name"] != "no_decay"]
    unfreeze_and_add_param_groups(model, model.net[1], optimizer, name="backbone")


def resume_with_another_number_of_optimizers():
    model = Model()
    optimizer = model.configure_optimizers()
    checkpoint = {"optimizer_states": [optimizer.state_dict()] * 2}
    save_layouts(checkpoint, [optimizer, optimizer], model)
    resume_layouts(checkpoint, [optimizer], model)


def resume_with_unknown_policy():
    model = Model()
    optimizer = model.configure_optimizers()
    resume_layouts({"optimizer_states": [optimizer.state_dict()]}, [optimizer], model, on_layout_change="ignore")


def with_groups(groups_of):
    class Custom(Model):
        def configure_param_groups(self):
            return groups_of(self)

    return Custom().configure_optimizers()


CATALOGUE = [
    # (misuse, error, culprit, fix)
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_param_names="bias")),
        TypeError,
        r"`no_decay_param_names` must be a tuple or list of strings, got 'bias'",
        r"Wrap a single pattern in a tuple: `\('bias',\)`",
        id="names-bare-string",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_module_types=nn.LayerNorm)),
        TypeError,
        r"`no_decay_module_types` must be a tuple or list",
        r"Wrap a single type in a tuple: `\(LayerNorm,\)`",
        id="types-single-class",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_module_types=(nn.LayerNorm(4),))),
        TypeError,
        r"`no_decay_module_types\[0\]` is a module instance",
        r"pass its class `LayerNorm` instead",
        id="types-module-instance",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_module_types=(int,))),
        TypeError,
        r"`no_decay_module_types\[0\]` is `int`, which is not an `nn.Module` subclass",
        r"List module classes such as `nn.LayerNorm`",
        id="types-not-a-module-class",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_module_types=("LayerNorm",))),
        TypeError,
        r"`no_decay_module_types\[0\]` is 'LayerNorm' of type `str`",
        r"entries must be `nn.Module` subclasses \(e.g. `nn.LayerNorm`\)",
        id="types-string",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_param_names=(nn.LayerNorm,))),
        TypeError,
        r"`no_decay_param_names\[0\]` is <class .*LayerNorm'> of type `type`",
        r"List module classes in `no_decay_module_types` instead",
        id="names-module-class",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(no_decay_param_names=("encoder..bias",))),
        ValueError,
        r"`no_decay_param_names\[0\]` is 'encoder..bias', which has an empty segment",
        r"use `\*` for one segment or `\*\*` for any number",
        id="names-empty-segment",
    ),
    pytest.param(
        lambda: param_groups(Model(), GroupRules(no_decay_param_names=("bias", "pos_embd"))),
        ValueError,
        r"pattern `pos_embd` matches no parameter",
        r"Did you mean `pos_embed`\?.*`GroupRules\(\.\.\., strict=False\)`",
        id="names-matching-nothing",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(weight_decay_multipliers=[("2.*", 2.0)])),
        TypeError,
        r"`weight_decay_multipliers` must be a dict",
        r"e.g. `\{'head.\*': 2.0, nn.Embedding: 0.1\}`",
        id="multipliers-not-a-dict",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(weight_decay_multipliers={"2.*": -1.0})),
        ValueError,
        r"`weight_decay_multipliers\['2.\*'\]` is -1.0",
        r"a multiplier must be a finite float >= 0",
        id="multiplier-negative",
    ),
    pytest.param(
        lambda: param_groups(net(), GroupRules(weight_decay_multipliers={"2.weight": 2.0})),
        ValueError,
        r"Groups \['decay_x2'\] scale the optimizer's weight decay",
        r"pass `weight_decay=`.*or use `NoDecayMixin`",
        id="multipliers-without-base-weight-decay",
    ),
    pytest.param(
        lambda: param_groups(Declares()),
        TypeError,
        r"`Declares.no_weight_decay\(\)` must return a set of parameter names",
        r"e.g. `\{'pos_embed'\}`; got 'pos_embed'",
        id="no-weight-decay-returns-a-string",
    ),
    pytest.param(
        lambda: type("Thing", (NoDecayMixin,), {})().configure_param_groups(),
        TypeError,
        r"`NoDecayMixin` must be mixed into an `nn.Module`",
        r"`class Thing\(NoDecayMixin, pl.LightningModule\)`",
        id="mixin-without-module",
    ),
    pytest.param(
        lambda: Model(optimizer=functools.partial(torch.optim.Rprop, lr=0.01)).configure_optimizers(),
        ValueError,
        r"`Rprop` has no `weight_decay` option",
        r"Use an optimizer with weight decay \(e.g. `torch.optim.AdamW`\)",
        id="optimizer-without-weight-decay",
    ),
    pytest.param(
        lambda: Model(optimizer=lambda groups: groups).configure_optimizers(),
        TypeError,
        r"`Model.optimizer` must return a `torch.optim.Optimizer` when called with param groups; it returned list",
        r"Set it to an optimizer class or a `functools.partial` of one",
        id="optimizer-returns-no-optimizer",
    ),
    pytest.param(
        lambda: Model(
            optimizer=lambda groups: torch.optim.AdamW([p for g in groups for p in g["params"]], weight_decay=0.1)
        ).configure_optimizers(),
        ValueError,
        r"`AdamW` did not keep the 2 param groups it was given \(decay, no_decay\)",
        r"`self.optimizer` must pass its first argument on as `params`",
        id="optimizer-flattens-the-groups",
    ),
    pytest.param(
        lambda: with_groups(lambda m: [{"params": [p for n, p in m.named_parameters() if n != "net.2.bias"]}]),
        ValueError,
        r"leaves out trainable parameter\(s\) `net.2.bias`",
        r"Put every trainable parameter in a group, or freeze it with `requires_grad_\(False\)`",
        id="param-groups-drop-a-parameter",
    ),
    pytest.param(
        lambda: with_groups(
            lambda m: [{"name": "a", "params": list(m.parameters())}, {"name": "b", "params": [m.net[0].weight]}]
        ),
        ValueError,
        r"puts parameter `net.0.weight` in groups `a` and `b`",
        r"each parameter must be in exactly one group",
        id="param-groups-duplicate-a-parameter",
    ),
    pytest.param(
        lambda: Model().requires_grad_(False).configure_optimizers(),
        ValueError,
        r"`Model` has no trainable parameters",
        r"Unfreeze at least one module before `fit`",
        id="everything-frozen",
    ),
    pytest.param(
        resume_with_another_number_of_optimizers,
        LayoutMismatchError,
        r"The checkpoint holds state for 2 optimizer\(s\), `configure_optimizers` now builds 1",
        r"Restore the previous optimizers, or resume the weights only",
        id="resume-with-another-number-of-optimizers",
    ),
    pytest.param(
        resume_with_unknown_policy,
        ValueError,
        r"`on_layout_change` is 'ignore'",
        r"choose `'remap'`.*or `'error'`",
        id="unknown-layout-policy",
    ),
    pytest.param(
        lambda: unfreeze_and_add_param_groups(*backbone_and_head()[:1], "net.0", backbone_and_head()[1]),
        TypeError,
        r"`modules` must be an `nn.Module` or an iterable of modules",
        r"e.g. `pl_module.backbone`; got 'net.0'",
        id="unfreeze-a-module-name",
    ),
    pytest.param(
        unfreeze_with_rprop,
        ValueError,
        r"`Rprop` has no `weight_decay` option, so unfrozen parameters cannot be split",
        r"Use an optimizer with weight decay",
        id="unfreeze-into-an-optimizer-without-weight-decay",
    ),
    pytest.param(
        unfreeze_twice_with_one_name,
        ValueError,
        r"already has a group named `backbone_no_decay`",
        r"pass another `name` to `unfreeze_and_add_param_groups`",
        id="unfreeze-group-name-taken",
    ),
    pytest.param(
        lambda: unfreeze_and_add_param_groups(Model(), nn.Linear(4, 4), torch.optim.AdamW(Model().parameters())),
        ValueError,
        r"A parameter of shape \(4, 4\) in `modules` is not a parameter of `pl_module`",
        r"unfreeze submodules of the LightningModule being trained",
        id="unfreeze-a-foreign-module",
    ),
]


@pytest.mark.parametrize(("misuse", "error", "culprit", "fix"), CATALOGUE)
def test_bad_input_names_culprit_and_fix(misuse, error, culprit, fix):
    """Test that a misuse raises the documented error, naming the culprit and the fix."""
    with pytest.raises(error) as raised:
        misuse()
    message = str(raised.value)
    assert re.search(culprit, message), message
    assert re.search(fix, message, flags=re.DOTALL), message


class DuplicatedParameters(Model):
    def configure_optimizers(self):
        return torch.optim.AdamW([p for m in self.modules() for p in m.parameters()], lr=0.01, weight_decay=0.1)


class NoOptimizer(Model):
    def __init__(self):
        super().__init__()
        self.optimizer = None


@pytest.mark.parametrize(
    ("make_model", "error", "culprit", "fix"),
    [
        pytest.param(
            NoOptimizer,
            ValueError,
            r"`NoOptimizer` declares no optimizer for `NoDecayMixin` to build",
            r"`self.optimizer = functools.partial\(torch.optim.AdamW",
            id="missing-optimizer",
        ),
        pytest.param(
            DuplicatedParameters,
            ValueError,
            r"holds parameter `net.0.weight` twice",
            r"build the optimizer from `self.parameters\(\)` \(not from `self.modules\(\)`",
            id="outside-optimizer-with-duplicate-parameters",
        ),
        pytest.param(
            lambda: Model(no_decay_param_names=("bias", "net.*.weigth")),
            ValueError,
            r"pattern `net.\*.weigth` matches no parameter",
            r"Did you mean",
            id="mixin-pattern-typo",
        ),
    ],
)
def test_bad_input_model_refused_before_any_step(tmp_path, make_model, error, culprit, fix):
    """Test that a misconfigured model is refused by `Trainer.fit` before any step, naming culprit and fix."""
    model = make_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    torch_warns = pytest.warns(UserWarning, match="duplicate parameters")  # torch only warns
    with pytest.raises(error) as raised, torch_warns if make_model is DuplicatedParameters else nullcontext():
        trainer.fit(model)
    message = str(raised.value)
    assert re.search(culprit, message), message
    assert re.search(fix, message, flags=re.DOTALL), message
    assert trainer.global_step == 0
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_bad_input_hand_written_decayed_exclusions_fixed_and_logged(tmp_path, nodecay_log):
    """Test the warn-and-continue row: excluded parameters in a decayed group are moved, with a log naming them."""

    class HandWritten(Model):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(HandWritten())
    [line] = log_lines(nodecay_log, "safety net")
    assert "moved 4 excluded tensors (net.0.bias, net.1.weight, net.1.bias, net.2.bias)" in line
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [0.1, 0.0]


def test_bad_input_backbone_finetuning_without_backbone(tmp_path):
    """Test that `NoDecayBackboneFinetuning` on a model without `backbone` says so (Lightning: AttributeError)."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[NoDecayBackboneFinetuning()]))
    with pytest.raises(ValueError, match=r"`Model` has no `backbone`.*subclass `NoDecayFinetuning`"):
        trainer.fit(Model())


def test_bad_input_resume_with_unknown_policy_before_any_step(tmp_path):
    """Test that a misspelt `on_layout_change` is refused when resuming, before any step."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[checkpoint])).fit(Model())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"`on_layout_change` is 'remapp'; choose `'remap'`"):
        trainer.fit(Model(on_layout_change="remapp"), ckpt_path=checkpoint.last_model_path)
    assert trainer.global_step == 0  # refused before the training state (and the loop's step count) is restored
