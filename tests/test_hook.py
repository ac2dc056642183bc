"""The weight-decay step hook (``lightning_nodecay.hook``): per-element masks and L1 groups, against oracles.

Its input checks are in ``test_hook_checks.py``."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from fits import FIT_OPTIMIZERS, trainer_kwargs
from models import TanhNet, TwoLayerModel
from oracles import OPTIMIZERS, assert_close, train
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from lightning_nodecay import GroupRules, WeightDecayHook, attach_weight_decay_hook, param_groups

WD = 0.1


class SplitNet(TanhNet):
    """``TanhNet`` with ``w`` split by hand into rows ``top`` (decayed) and ``bottom`` (not)."""

    def __init__(self, rows: int, seed: int = 0) -> None:
        super().__init__(seed)
        w = self.w
        del self.w
        self.top = nn.Parameter(w[:rows].detach().clone())
        self.bottom = nn.Parameter(w[rows:].detach().clone())

    def weight(self) -> torch.Tensor:
        return torch.cat([self.top, self.bottom])


@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_all_ones_equal_group_weight_decay(name, closure):
    """Test that an all-ones mask for 20 steps equals the group's own weight decay."""
    plain, masked = TanhNet(), TanhNet()
    train(plain, OPTIMIZERS[name](plain.parameters(), weight_decay=WD), closure=closure)
    optimizer = OPTIMIZERS[name](masked.parameters(), weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=masked)  # `v` stays unmasked
    train(masked, optimizer, closure=closure)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # the hook did all the decay
    assert_close(masked.w, plain.w)
    assert_close(masked.v, plain.v)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_zero_one_rows_equal_tensor_split_by_hand(name):
    """Test that a 0/1 mask (one per row, broadcast) equals the tensor split into decay / no-decay groups."""
    split, masked = SplitNet(rows=2), TanhNet()
    groups = [{"params": [split.top, split.v]}, {"params": [split.bottom], "weight_decay": 0.0}]
    train(split, OPTIMIZERS[name](groups, weight_decay=WD))
    optimizer = OPTIMIZERS[name](masked.parameters(), weight_decay=WD)
    attach_weight_decay_hook(optimizer, {masked.w: torch.tensor([[1.0], [1.0], [0.0], [0.0]])})
    train(masked, optimizer)
    assert_close(masked.w, split.weight())
    assert_close(masked.v, split.v)


def sgd_momentum_oracle(p, buf, grad, lr, wd, mask, momentum=0.9):
    d = grad + wd * mask * p
    buf = d if buf is None else momentum * buf + d
    return p - lr * buf, buf


def adamw_oracle(p, state, grad, lr, wd, mask, betas=(0.9, 0.999), eps=1e-8):
    t, m, v = state if state else (0, torch.zeros_like(p), torch.zeros_like(p))
    t, p = t + 1, p * (1 - lr * wd * mask)
    m, v = betas[0] * m + (1 - betas[0]) * grad, betas[1] * v + (1 - betas[1]) * grad**2
    step = lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p - step, (t, m, v)


def train_with_oracle(reference: TanhNet, oracle, lr: float, strength: float, mask: torch.Tensor) -> None:
    """`train` ``reference`` with ``oracle`` as its update: ``w`` under ``mask``, ``v`` unmasked."""
    probe = torch.optim.SGD(reference.parameters(), lr=0.0)  # computes gradients only
    states: dict[str, object] = {"w": None, "v": None}

    def step(_=None) -> None:
        with torch.no_grad():
            for key, m in (("w", mask.double()), ("v", torch.ones(()))):
                p = getattr(reference, key)
                new, states[key] = oracle(p.clone(), states[key], p.grad, lr, strength, m)
                p.copy_(new)

    probe.step = step  # the oracle replaces the update; `train` drives the same batches
    train(reference, probe)


@pytest.mark.parametrize(
    ("name", "oracle", "lr"), [("SGD-momentum", sgd_momentum_oracle, 0.05), ("AdamW", adamw_oracle, 0.01)]
)
def test_masks_fractional_multipliers_match_hand_written_update(name, oracle, lr):
    """Test that per-element multipliers (0, 0.5, 1, 3) follow a hand-written SGD / AdamW update."""
    mask = torch.tensor([0.0, 0.5, 1.0, 3.0]).repeat(6, 1).T.contiguous()
    net, reference = TanhNet(), TanhNet()
    optimizer = OPTIMIZERS[name](net.parameters(), weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": mask}, module=net)
    train(net, optimizer)
    train_with_oracle(reference, oracle, lr, WD, mask)
    assert_close(net.w, reference.w)
    assert_close(net.v, reference.v)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_follow_lr_scheduler(name):
    """Test that a scheduler changing lr mid-run is honoured: a uniform 0.5 mask equals a group with wd * 0.5."""

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 10 else 0.1 + step / 10)

    plain, masked = TanhNet(), TanhNet()
    optimizer = OPTIMIZERS[name](plain.parameters(), weight_decay=WD * 0.5)
    train(plain, optimizer, scheduler=schedule(optimizer))
    optimizer = OPTIMIZERS[name](masked.parameters(), weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": torch.full((4, 1), 0.5), "v": torch.full((3, 4), 0.5)}, module=masked)
    train(masked, optimizer, scheduler=schedule(optimizer))
    assert optimizer.param_groups[0]["lr"] != OPTIMIZERS[name].keywords["lr"]
    assert_close(masked.w, plain.w)


@pytest.mark.parametrize("name", ["SGD-momentum", "AdamW"])
def test_masks_maximize_decays_towards_zero(name):
    """Test that with `maximize=True` an all-ones mask still equals the optimizer's own decay."""
    plain, masked = TanhNet(), TanhNet()
    train(plain, OPTIMIZERS[name](plain.parameters(), weight_decay=WD, maximize=True))
    optimizer = OPTIMIZERS[name](masked.parameters(), weight_decay=WD, maximize=True)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=masked)
    train(masked, optimizer)
    assert_close(masked.w, plain.w)


@pytest.mark.parametrize("name", ["SGD-momentum", "AdamW"])
def test_masks_amp_skipped_step_applies_no_decay(name):
    """Test that a step `GradScaler` skips for inf gradients applies no decay; the others match plain decay."""

    def run(net, optimizer, poisoned_steps):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        gen, after = torch.Generator().manual_seed(1), []
        for step in range(4):
            x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
            optimizer.zero_grad()
            loss = net(x).pow(2).mean() * (math.inf if step in poisoned_steps else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            after.append(net.w.detach().clone())
        return after

    plain, masked = TanhNet(), TanhNet()
    expected = run(plain, OPTIMIZERS[name](plain.parameters(), weight_decay=WD), poisoned_steps={1})
    optimizer = OPTIMIZERS[name](masked.parameters(), weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=masked)
    after = run(masked, optimizer, poisoned_steps={1})
    assert torch.equal(after[1], after[0])  # skipped: not even decayed
    assert not torch.equal(after[2], after[1])
    for actual, reference in zip(after, expected, strict=True):
        assert_close(actual, reference)


def test_masks_checkpoint_in_optimizer_state_dict_round_trip():
    """Test that masks travel in the optimizer's state_dict and a restore continues the run exactly."""
    mask = torch.tensor([[1.0], [0.0], [2.0], [0.5]])
    net, resumed = TanhNet(), TanhNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": mask}, module=net)
    train(net, optimizer, steps=5)
    state = copy.deepcopy(optimizer.state_dict())  # `state_dict()` shares the live state tensors
    assert set(state["weight_decay_masks"]) == {0}
    resumed.load_state_dict(net.state_dict())
    other = torch.optim.AdamW(resumed.parameters(), lr=0.01, weight_decay=WD)
    handle = attach_weight_decay_hook(other, {"w": torch.ones(4, 6)}, module=resumed)
    other.load_state_dict(state)
    assert torch.equal(handle.named_masks()["w"], mask.double())
    assert other.param_groups[0]["weight_decay"] == 0.0
    assert other.param_groups[0]["hook_weight_decay"] == WD
    train(net, optimizer, steps=5)
    train(resumed, other, steps=5)
    assert_close(resumed.w, net.w)


def test_masks_follow_module_to():
    """Test that masks follow their parameter's dtype after `module.to(...)` and stay exact."""
    net, reference = TanhNet(), TanhNet()
    net.float()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=WD)
    handle = attach_weight_decay_hook(optimizer, {"w": torch.tensor([[1.0], [0.0], [1.0], [0.0]])}, module=net)
    assert handle.masks[net.w].dtype == torch.float32
    net.double()
    train(net, optimizer)
    assert handle.masks[net.w].dtype == torch.float64
    plain = reference.w.detach().clone()
    groups = [{"params": [reference.w, reference.v]}]
    reference_optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=WD)
    reference_handle = attach_weight_decay_hook(
        reference_optimizer, {"w": torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)}, module=reference
    )
    train(reference, reference_optimizer)
    assert reference_handle.masks[reference.w].dtype == torch.float64
    assert not torch.equal(reference.w, plain)
    torch.testing.assert_close(net.w, reference.w, rtol=1e-5, atol=1e-6)  # first values were float32


def l1_oracle_coupled(p, buf, grad, lr, l1, mask, momentum=0.9):
    d = grad + l1 * mask * torch.sign(p)
    buf = d if buf is None else momentum * buf + d
    return p - lr * buf, buf


def l1_oracle_decoupled(p, state, grad, lr, l1, mask):
    shrunk = torch.sign(p) * torch.clamp(p.abs() - lr * l1 * mask, min=0.0)
    return adamw_oracle(shrunk, state, grad, lr, 0.0, mask)


@pytest.mark.parametrize(
    ("name", "oracle", "lr"),
    [("SGD-momentum", l1_oracle_coupled, 0.05), ("AdamW", l1_oracle_decoupled, 0.01)],
)
def test_l1_group_matches_hand_written_update(name, oracle, lr):
    """Test that an L1 group (masked `w`, unmasked `v`) follows the hand-written coupled / proximal update."""
    l1 = 2.0  # strong enough that the proximal threshold (lr * l1 = 0.02 a step) clips small weights
    mask = torch.tensor([[1.0], [0.0], [0.5], [2.0]])
    net, reference = TanhNet(), TanhNet()
    groups = param_groups(net, GroupRules(weight_decay_l1=("*",), no_decay_param_names=()))
    assert [(g["name"], g["weight_decay_penalty"]) for g in groups] == [("decay_l1", "l1")]
    optimizer = OPTIMIZERS[name](groups, weight_decay=l1)
    attach_weight_decay_hook(optimizer, {"w": mask}, module=net)
    train(net, optimizer)
    train_with_oracle(reference, oracle, lr, l1, mask)
    assert_close(net.w, reference.w)
    assert_close(net.v, reference.v)


def test_masks_unknown_optimizer_with_declared_style():
    """Test that an optimizer outside torch.optim works once its decay style is declared."""

    class MyAdamW(torch.optim.AdamW):
        pass

    plain, masked = TanhNet(), TanhNet()
    train(plain, torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=WD))
    optimizer = MyAdamW(masked.parameters(), lr=0.01, weight_decay=WD)
    with pytest.raises(ValueError, match=r"`MyAdamW` is not a `torch.optim` optimizer.*decay_style=\"decoupled\""):
        attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=masked)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=masked, decay_style="decoupled")
    train(masked, optimizer)
    assert_close(masked.w, plain.w)


def test_masks_remove_gives_weight_decay_back():
    """Test that `remove()` detaches the hook and restores the group's weight_decay."""
    net = TanhNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=WD)
    handle = attach_weight_decay_hook(optimizer, {"w": torch.zeros(4, 6)}, module=net)
    assert optimizer.param_groups[0]["weight_decay_mask_share"] == pytest.approx(24 / 36)
    assert WeightDecayHook.of(optimizer) is handle
    handle.remove()
    assert WeightDecayHook.of(optimizer) is None
    assert {k for k in optimizer.param_groups[0] if "decay" in k} == {"weight_decay", "decoupled_weight_decay"}
    assert optimizer.param_groups[0]["weight_decay"] == WD
    before = net.w.detach().clone()
    net.w.grad, net.v.grad = torch.zeros_like(net.w), torch.zeros_like(net.v)
    optimizer.step()
    assert_close(net.w, before * (1 - 0.01 * WD))  # the zero mask no longer applies


def test_masks_skip_parameters_without_gradient():
    """Test that, as in torch.optim, a parameter without a gradient is not decayed."""
    net = TanhNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 6)}, module=net)
    before = net.w.detach().clone()
    net.v.grad = torch.ones_like(net.v)
    optimizer.step()
    assert torch.equal(net.w, before)


def test_masks_load_state_dict_of_unmasked_run_keeps_the_hook():
    """Test that loading a state_dict saved without masks re-hooks the groups it replaces."""
    plain, masked = TanhNet(), TanhNet()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, weight_decay=0.3)
    train(plain, optimizer, steps=2)
    hooked = torch.optim.SGD(masked.parameters(), lr=0.05, weight_decay=WD)
    handle = attach_weight_decay_hook(hooked, {"w": torch.zeros(4, 6)}, module=masked)
    hooked.load_state_dict(optimizer.state_dict())
    group = hooked.param_groups[0]
    assert (group["weight_decay"], group["hook_weight_decay"], group["weight_decay_mask_share"]) == (
        0.0,
        0.3,
        pytest.approx(24 / 36),
    )
    assert torch.equal(handle.masks[masked.w], torch.zeros(4, 6, dtype=torch.float64))


class MaskedModel(TwoLayerModel):
    """``TwoLayerModel`` with ``mask`` (or none) on ``head.weight``, and an infinite loss at the steps in ``poison``."""

    def __init__(self, mask=None, optimizer=None, **attributes) -> None:
        super().__init__(optimizer or FIT_OPTIMIZERS["AdamW"])
        self.mask = mask
        self.poison: set[int] = set()
        for key, value in attributes.items():
            setattr(self, key, value)

    def weight_decay_masks(self) -> dict[str, torch.Tensor]:
        return {} if self.mask is None else {"head.weight": self.mask}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.global_step in self.poison else loss


def fit(model: pl.LightningModule, tmp_path, **overrides) -> pl.LightningModule:
    pl.Trainer(**trainer_kwargs(tmp_path, **overrides)).fit(model)
    return model


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", FIT_OPTIMIZERS.values(), ids=FIT_OPTIMIZERS)
def test_mixin_masks_accumulation_and_clipping_match_plain_decay(tmp_path, optimizer):
    """Test that through a Trainer (accumulation, clipping) an all-ones mask equals the optimizer's decay."""
    kwargs = dict(max_steps=4, accumulate_grad_batches=2, gradient_clip_val=0.05, precision="64-true")
    plain = fit(MaskedModel(optimizer=optimizer), tmp_path, **kwargs)
    masked = fit(MaskedModel(torch.ones(2, 1), optimizer=optimizer), tmp_path, **kwargs)
    group = masked.trainer.optimizers[0].param_groups[0]
    assert (group["name"], group["weight_decay"], group["hook_weight_decay"]) == ("decay", 0.0, 0.5)
    assert group["weight_decay_mask_share"] == pytest.approx(8 / (128 + 8))
    for actual, expected in zip(params(masked), params(plain), strict=True):
        assert_close(actual, expected)


def test_mixin_masks_amp_skipped_step_through_trainer(tmp_path):
    """Test that Lightning's 16-mixed GradScaler skipping an overflowing step skips the masked decay too."""
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.append(pl_module.head.weight.detach().clone())

    def run(mask):
        model = MaskedModel(mask, poison={1})
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        fit(model, tmp_path, max_steps=3, plugins=[plugin], callbacks=[Record()])
        return model

    plain = run(None)
    seen.clear()
    masked = run(torch.ones(2, 1))
    assert torch.equal(seen[1], seen[0])
    assert not torch.equal(seen[2], seen[1])
    for actual, expected in zip(params(masked), params(plain), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_mixin_masks_saved_in_checkpoint_and_restored(tmp_path):
    """Test that a resumed run takes its masks from the checkpoint and ends where an uninterrupted run ends."""
    mask = torch.tensor([[0.0], [3.0]])
    kwargs = dict(precision="64-true", enable_checkpointing=True)
    whole = fit(MaskedModel(mask), tmp_path / "whole", max_epochs=2, max_steps=-1, **kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(MaskedModel(mask), tmp_path / "first", max_epochs=1, max_steps=-1, callbacks=[checkpoint], **kwargs)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert torch.equal(next(iter(saved["optimizer_states"][0]["weight_decay_masks"].values())), mask.double())
    assert not any("mask" in key for key in saved["state_dict"])  # the model's weights stay untouched
    resumed = MaskedModel(torch.ones(2, 1))  # a different mask: the checkpoint's must win
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "second", max_epochs=2, max_steps=-1, **kwargs))
    trainer.fit(resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    handle = WeightDecayHook.of(trainer.optimizers[0])
    assert torch.equal(handle.named_masks()["head.weight"], mask.double())
    for actual, expected in zip(params(resumed), params(whole), strict=True):
        assert_close(actual, expected)


def test_mixin_l1_rule_and_summary(tmp_path, nodecay_log):
    """Test that an L1 rule builds an L1 group the Trainer hooks, and the summary shows masks and L1."""
    model = MaskedModel(
        torch.tensor([[1.0], [0.0]]),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, weight_decay=0.01),
        weight_decay_l1=("body.*",),
    )
    before = model.body.weight.detach().clone()
    fit(model, tmp_path, max_steps=2)
    groups = model.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"], g.get("hook_weight_decay")) for g in groups] == [
        ("decay", 0.0, 0.01),
        ("no_decay", 0.0, None),
        ("decay_l1", 0.0, 0.01),
    ]
    assert not torch.equal(model.body.weight, before)
    text = nodecay_log.text
    assert "0 | decay    | x0.5  | 0.01         | 1       | 8        | 100%" in text  # decay x: mean of the mask
    assert "2 | decay_l1 | x1 L1 | 0.01         | 1       | 128" in text
    assert "per-element mask: 1 tensor (head.weight)" in text
    assert "L1 rule `body.*`: 1 tensor (body.weight)" in text


def test_mixin_masks_applied_when_optimizer_built_elsewhere(tmp_path):
    """Test that masks are applied at fit start when `configure_optimizers` was replaced."""

    class Replaced(MaskedModel):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)

    model = fit(Replaced(torch.zeros(2, 1)), tmp_path, max_steps=1)
    optimizer = model.trainer.optimizers[0]
    assert WeightDecayHook.of(optimizer).named_masks().keys() == {"head.weight"}
    assert [g.get("hook_weight_decay") for g in optimizer.param_groups] == [0.5, None]  # bias moved by safety net

    class ReplacedL1(Replaced):
        weight_decay_l1 = ("body.weight",)

    optimizer = fit(ReplacedL1(), tmp_path, max_steps=1).trainer.optimizers[0]
    assert [(g["name"], g.get("weight_decay_penalty"), g.get("hook_weight_decay")) for g in optimizer.param_groups] == [
        ("decay", None, None),
        ("no_decay", None, None),
        ("decay_l1", "l1", 0.5),  # the L1 rule applied by the safety net, its decay by the hook
    ]
    assert WeightDecayHook.of(optimizer).hooked_groups == [2]


def test_masks_accept_bool_masks():
    """Test that a bool mask acts as the 0/1 float mask it stands for."""
    as_float, as_bool = TanhNet(), TanhNet()
    for net, mask in (
        (as_float, torch.tensor([[1.0], [0.0], [1.0], [0.0]])),
        (as_bool, torch.tensor([[True], [False], [True], [False]])),
    ):
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=WD)
        attach_weight_decay_hook(optimizer, {net.w: mask})
        train(net, optimizer, steps=5)
    assert torch.equal(as_bool.w, as_float.w)
