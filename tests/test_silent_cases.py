"""Nothing silently wrong after fit start (issue 10): one regression test per case that once went wrong silently.

The promise: every trainable parameter's effective weight decay equals base x its decided multiplier x its mask,
excluded parameters get exactly zero, or the library raises before the wrong step, naming the culprit and the fix.
Each test checks the weights against a hand computation, or that the error comes before any weight changed.
Third-party optimizer patterns are reproduced by small optimizer classes written here.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, log_lines, run_cli, trainer_kwargs
from models import RandomDataset, TanhNet
from oracles import AdamWByHand, ShrinkByHand, assert_close, train
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import NoDecayMixin, WeightDecayHook, attach_weight_decay_hook
from lightning_nodecay._semantics import group_style

LR, WD = 0.05, 0.5  # the fits' learning rate and base weight decay
EPS = 1e-8  # Adam's default eps
ROWS = torch.tensor([[0.0], [1.0]])  # a mask on `head.weight` (2, 4): row 0 not decayed, row 1 decayed

SGD = functools.partial(torch.optim.SGD, lr=LR, weight_decay=WD)
ADAMW = functools.partial(torch.optim.AdamW, lr=LR, weight_decay=WD)


def closure_loss(closure: Any) -> Any:
    """What third-party optimizers' `step` does first: run the closure with gradients on, if there is one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Net(NoDecayMixin, pl.LightningModule):
    """``body`` Linear(4, 4) -> tanh -> ``head`` Linear(4, 2); ``batches`` batches of 4 per epoch (default one).

    The optimizer (default SGD(lr=LR, weight_decay=WD)) is built by the mixin; ``masks`` are its declared
    weight-decay masks; any other keyword sets a mixin declaration on the instance.
    """

    def __init__(self, optimizer: Any = None, masks: dict[str, torch.Tensor] | None = None, **declarations: Any):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.optimizer = optimizer or SGD
        self.masks = masks or {}
        self.batches = 1
        for name, value in declarations.items():
            setattr(self, name, value)

    def weight_decay_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.masks)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.head(torch.tanh(self.body(batch))) - 1).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(4, 4 * self.batches), batch_size=4)


class Masked(Net):
    """``Net`` with the mask ``ROWS`` declared on ``head.weight``."""

    def __init__(self, optimizer: Any = None, **declarations: Any) -> None:
        super().__init__(optimizer, {"head.weight": ROWS}, **declarations)


class StepRecorder(pl.Callback):
    """Records every parameter and its gradient right before each optimizer step (gradients final, before any
    decay), and the parameters after the step, by name."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def fit(model: pl.LightningModule, tmp_path, **overrides: Any) -> pl.Trainer:
    """Fit ``model`` in float64 on CPU (``max_steps`` default 1), without checkpoints or logger."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **{"max_steps": 1, "precision": "64-true", **overrides}))
    trainer.fit(model)
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def sgd_step(w: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor = 0.0) -> torch.Tensor:
    """One step of SGD without momentum, coupled decay: ``w - lr * (g + wd * w)``."""
    return w - LR * (g + wd * w)


def adamw_first_step(w: torch.Tensor, g: torch.Tensor, wd: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The first step of AdamW: decoupled decay, then Adam's bias-corrected update, which is ``g / (|g| + eps)``."""
    return w * (1 - LR * wd) - LR * g / (g.abs() + EPS)


def check_step(recorder: StepRecorder, step: int, expected: dict[str, Any]) -> None:
    """Assert every parameter after ``step`` equals ``expected[name](before, grad)``."""
    before, grads, after = recorder.before[step], recorder.grads[step], recorder.after[step]
    assert expected.keys() == after.keys()
    for name, oracle in expected.items():
        assert_close(after[name], oracle(before[name], grads[name]))


#: The step of each parameter of `Net` under SGD, with the base decay on the weights, none on the biases.
SGD_PLAIN = {
    "body.weight": lambda w, g: sgd_step(w, g, WD),
    "body.bias": sgd_step,
    "head.weight": lambda w, g: sgd_step(w, g, WD),
    "head.bias": sgd_step,
}


# 1 -------------------------------------------------------------------------------------------------------------
def test_case01_resume_without_masks_gives_plain_decay_back(tmp_path, nodecay_log):
    """Test that resuming a masked run with a model that declares no masks gives the `decay` group its plain decay."""
    fit_with_checkpoints(tmp_path / "a", Masked(), max_steps=2, precision="64-true")
    saved = torch.load(tmp_path / "a" / "epoch=1-step=2.ckpt", weights_only=True)["optimizer_states"][0]
    assert saved["param_groups"][0]["hook_weight_decay"] == WD  # the masked run's decay went through the hook

    recorder = StepRecorder()
    trainer = fit_with_checkpoints(
        tmp_path / "b",
        Net(),
        max_steps=3,
        ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt",
        callbacks=[recorder],
        precision="64-true",
    )
    optimizer = trainer.optimizers[0]
    decay = optimizer.param_groups[0]
    assert (decay["name"], decay["weight_decay"]) == ("decay", WD)
    assert "hook_weight_decay" not in decay
    assert "weight_decay_mask_share" not in decay
    assert WeightDecayHook.of(optimizer) is None
    assert log_lines(nodecay_log, "the checkpoint's weight-decay masks are not used")
    check_step(recorder, 0, SGD_PLAIN)  # `head.weight` decays whole, by lr * wd, not by its old mask


# 2 -------------------------------------------------------------------------------------------------------------
def test_case02_remap_keeps_the_current_hook_weight_decay(tmp_path, nodecay_log):
    """Test that a masked multiplier group renamed between runs (`decay_x2` -> `decay_x3`) is remapped with the
    current `hook_weight_decay` (3 x base), not 0, and decays by it."""
    fit_with_checkpoints(
        tmp_path / "a", Masked(weight_decay_multipliers={"head.weight": 2.0}), max_steps=2, precision="64-true"
    )
    recorder = StepRecorder()
    resumed = Masked(weight_decay_multipliers={"head.weight": 3.0}, on_layout_change="remap")
    trainer = fit_with_checkpoints(
        tmp_path / "b",
        resumed,
        max_steps=3,
        ckpt_path=tmp_path / "a" / "epoch=1-step=2.ckpt",
        callbacks=[recorder],
        precision="64-true",
    )
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["decay", "no_decay", "decay_x3"]
    assert (groups[2]["weight_decay"], groups[2]["hook_weight_decay"]) == (0.0, pytest.approx(3 * WD))
    [line] = log_lines(nodecay_log, "NoDecayMixin resume: param groups changed")
    assert "`head.weight`: `decay_x2` -> `decay_x3`" in line
    check_step(recorder, 0, {**SGD_PLAIN, "head.weight": lambda w, g: sgd_step(w, g, 3 * WD * ROWS)})


# 3 -------------------------------------------------------------------------------------------------------------
class HeadX2(Net):
    """``head.*`` decayed at twice the base; the optimizer built by hand on ``self.parameters()``."""

    weight_decay_multipliers = {"head.*": 2.0}  # noqa: RUF012

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WD)


class CliHeadX2(HeadX2):
    """``HeadX2`` for LightningCLI's own ``--optimizer`` flag, which replaces ``configure_optimizers``."""

    def __init__(self) -> None:
        super().__init__()


def test_case03_multipliers_applied_to_an_optimizer_built_outside_the_mixin(tmp_path, nodecay_log):
    """Test that multipliers reach an optimizer built on `self.parameters()` (by hand, or by LightningCLI's
    `--optimizer`): the safety net creates `decay_x2` at 2x the decay, and the summary shows the real groups."""
    recorder = StepRecorder()
    model = HeadX2()
    trainer = fit(model, tmp_path, callbacks=[recorder])
    found = [(g["name"], g["weight_decay"], len(g["params"])) for g in trainer.optimizers[0].param_groups]
    assert found == [("decay", WD, 1), ("no_decay", 0.0, 2), ("decay_x2", 2 * WD, 1)]
    assert trainer.optimizers[0].param_groups[2]["params"] == [model.head.weight]
    check_step(
        recorder,
        0,
        {
            "body.weight": lambda w, g: adamw_first_step(w, g, WD),
            "body.bias": adamw_first_step,
            "head.weight": lambda w, g: adamw_first_step(w, g, 2 * WD),
            "head.bias": adamw_first_step,  # `head.*` x2, but biases are excluded: the smallest wins
        },
    )
    [summary] = log_lines(nodecay_log, "Weight decay groups of `HeadX2`")
    assert "2 | decay_x2 | x2    | 1            | 1       | 8" in summary  # the real group, with its real decay
    assert "These are the optimizer's own groups" not in summary  # the split made them the rules' groups

    nodecay_log.clear()
    with pytest.warns(UserWarning, match="will be overridden by `LightningCLI.configure_optimizers`"):
        cli = run_cli(CliHeadX2, tmp_path, "--optimizer=AdamW", "--optimizer.lr=0.01", "--optimizer.weight_decay=0.3")
    found = [(g["name"], g["weight_decay"]) for g in cli.trainer.optimizers[0].param_groups]
    assert found == [("decay", 0.3), ("no_decay", 0.0), ("decay_x2", pytest.approx(0.6))]
    [summary] = log_lines(nodecay_log, "Weight decay groups of `CliHeadX2`")
    assert "2 | decay_x2 | x2    | 0.6" in summary


# 4 -------------------------------------------------------------------------------------------------------------
class ChangesGroupsLater(pl.Callback):
    """At the start of epoch 1, breaks the groups in one of two ways, and records the weights then."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        decay, no_decay = trainer.optimizers[0].param_groups[:2]
        if self.how == "excluded moved into decay":
            decay["params"] += no_decay["params"]  # the same list objects, longer / shorter
            no_decay["params"].clear()
        else:
            no_decay["weight_decay"] = 0.1
        self.weights = weights(pl_module)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("excluded moved into decay", r"`decay` of `SGD` holds parameters excluded from weight decay \(`body.bias`"),
        ("no_decay decayed", r"`no_decay` of `SGD` \(`body.bias`, `head.bias`\) .* has decay 0.1 \(expected exactly 0"),
    ],
)
def test_case04_later_changes_to_the_groups_caught_before_the_next_step(tmp_path, how, message):
    """Test that moving excluded parameters into a decayed group, or decaying `no_decay`, after fit start raises
    before the next optimizer step, which leaves every weight as it was."""
    model = Net()
    callback = ChangesGroupsLater(how)
    with pytest.raises(ValueError, match=message):
        fit(model, tmp_path, max_steps=3, callbacks=[callback])
    assert callback.weights
    assert_unchanged(model, callback.weights)


class ScalesTheMaskedGroupAlone(pl.Callback):
    """At step 1, multiplies the masked `decay_x2` group's `hook_weight_decay` by 5 (not proportional to `decay`),
    and records the weights then."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == 1:
            trainer.optimizers[0].param_groups[2]["hook_weight_decay"] *= 5
            self.weights = weights(pl_module)


def test_case04_later_change_caught_before_the_masked_decay_under_amp(tmp_path):
    """Test that under AMP's GradScaler (which calls `optimizer.step()` without a closure) a later change to a masked
    group is caught before the step hook applies its decoupled decay, so no weight changes at that step."""
    model = Masked(ADAMW, weight_decay_multipliers={"head.weight": 2.0})
    callback = ScalesTheMaskedGroupAlone()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, plugins=[plugin], callbacks=[callback]))
    with pytest.raises(ValueError, match=r"no longer share one base weight decay: `decay` 0.5 \(x1\), `decay_x2` 5"):
        trainer.fit(model)
    assert callback.weights
    assert_unchanged(model, callback.weights)


# 5 -------------------------------------------------------------------------------------------------------------
class HandWrittenSchedule(pl.Callback):
    """From step 1, sets `weight_decay = wd * multiplier` on every group, as a hand-written decay schedule does."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == 1:
            for group in trainer.optimizers[0].param_groups:
                group["weight_decay"] = 0.9 * WD * group.get("weight_decay_multiplier", 1)
            self.weights = weights(pl_module)


def test_case05_hand_written_schedule_on_a_masked_group_raises(tmp_path):
    """Test that a schedule writing `weight_decay` of a masked group raises before the step, pointing to
    `hook_weight_decay`."""
    model = Masked()
    schedule = HandWrittenSchedule()
    with pytest.raises(
        ValueError,
        match=r"`decay` of `SGD` .* is decayed by the step hook .* must write a hooked group's `hook_weight_decay`",
    ):
        fit(model, tmp_path, max_steps=3, callbacks=[schedule])
    assert schedule.weights
    assert_unchanged(model, schedule.weights)


# 6 -------------------------------------------------------------------------------------------------------------
class LayerWise(Net):
    """One decay and one no_decay group per layer, with a learning rate per layer."""

    def configure_param_groups(self) -> list[dict[str, Any]]:
        groups = []
        for i, layer in enumerate((self.body, self.head)):
            lr = LR / (i + 1)
            groups.append({"name": f"layer{i}_decay", "params": [layer.weight], "lr": lr})
            groups.append({"name": f"layer{i}_no_decay", "params": [layer.bias], "lr": lr, "weight_decay": 0.0})
        return groups


def test_case06_summary_describes_the_optimizers_own_groups(tmp_path, nodecay_log):
    """Test that the fit-start summary lists the groups of a custom `configure_param_groups`, with their real
    decay, and says they differ from the rules' groups."""
    trainer = fit(LayerWise(), tmp_path)
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["layer0_decay", "layer0_no_decay", "layer1_decay", "layer1_no_decay"]
    [summary] = log_lines(nodecay_log, "Weight decay groups of `LayerWise`")
    lines = summary.splitlines()
    assert lines[1] == "  | Group           | Decay | Weight decay | Tensors | Elements"
    assert lines[3:7] == [
        "0 | layer0_decay    | x1    | 0.5          | 1       | 16",
        "1 | layer0_no_decay | x0    | 0            | 1       | 4",
        "2 | layer1_decay    | x1    | 0.5          | 1       | 8",
        "3 | layer1_no_decay | x0    | 0            | 1       | 2",
    ]
    assert "These are the optimizer's own groups; the rules alone would give decay, no_decay." in summary


# 7 -------------------------------------------------------------------------------------------------------------
class CachesBaseLrs(torch.optim.Optimizer):
    """SGD with coupled decay that keeps one lr per group from construction and steps
    ``zip(self.param_groups, self.base_lrs)``, as torch_optimizer's AdaBound does: a group added later is never
    stepped."""

    def __init__(self, params: Any, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.base_lrs = [group["lr"] for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group, base_lr in zip(self.param_groups, self.base_lrs):  # noqa: B905 (the pattern under test)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + group["weight_decay"] * p, alpha=-base_lr)
        return loss


class CachesBuiltByHand(Net):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return CachesBaseLrs(self.parameters(), lr=LR, weight_decay=WD)


def test_case07_optimizer_caching_one_entry_per_group(tmp_path):
    """Test that an optimizer keeping per-group lists is refused when built on `self.parameters()` (naming
    `base_lrs` and the fix), and trains every group when the mixin builds it."""
    model = CachesBuiltByHand()
    before = weights(model)
    with pytest.raises(
        ValueError,
        match=r"`CachesBaseLrs` keeps one entry per param group .*\(`base_lrs`\).*"
        r"set `self.optimizer` to `functools.partial\(CachesBaseLrs, \.\.\.\)`",
    ):
        fit(model, tmp_path)
    assert_unchanged(model, before)

    recorder = StepRecorder()
    model = Net(functools.partial(CachesBaseLrs, lr=LR, weight_decay=WD))
    trainer = fit(model, tmp_path, max_steps=2, callbacks=[recorder])
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["decay", "no_decay"]
    assert trainer.optimizers[0].base_lrs == [LR, LR]
    for step in range(2):
        assert not torch.equal(recorder.after[step]["head.bias"], recorder.before[step]["head.bias"])
        check_step(recorder, step, SGD_PLAIN)


# 8 -------------------------------------------------------------------------------------------------------------
class MyAdamW(torch.optim.AdamW):
    """A subclass whose ``step`` calls ``super().step()``: torch wraps both classes' ``step`` with the hooks."""

    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


def test_case08_hook_applied_once_through_a_subclass_step(tmp_path):
    """Test that with a subclass calling `super().step()` (both steps wrapped by torch), the masked decay is applied
    once per step: `1 - lr * wd * mask`, not its square, with and without a closure and in a Trainer fit."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch patches AdamW.step ...
    mask = torch.tensor([[0.0], [1.0], [2.0], [0.5]], dtype=torch.float64)
    for closure in (False, True):
        net, reference = TanhNet(), TanhNet()
        optimizer = MyAdamW(net.parameters(), lr=0.01, weight_decay=WD)  # ... and MyAdamW.step
        assert getattr(torch.optim.AdamW.step, "hooked", False)
        assert getattr(MyAdamW.step, "hooked", False)
        hook = attach_weight_decay_hook(optimizer, {"w": mask}, module=net, decay_style="decoupled")
        train(net, optimizer, steps=10, closure=closure)
        by_hand = AdamWByHand(
            [{"params": reference.parameters(), "shrink": WD}], masks={reference.w: mask}, lr=0.01, weight_decay=0.0
        )
        train(reference, by_hand, steps=10)
        assert_close(net.w, reference.w)
        assert_close(net.v, reference.v)
        assert hook.steps == 10

    recorder = StepRecorder()
    model = Masked(functools.partial(MyAdamW, lr=LR, weight_decay=WD), decay_style="decoupled")
    trainer = fit(model, tmp_path, callbacks=[recorder])
    assert WeightDecayHook.of(trainer.optimizers[0]).steps == 1
    check_step(
        recorder,
        0,
        {
            "body.weight": lambda w, g: adamw_first_step(w, g, WD),
            "body.bias": adamw_first_step,
            "head.weight": lambda w, g: adamw_first_step(w, g, WD * ROWS),
            "head.bias": adamw_first_step,
        },
    )


# 9 -------------------------------------------------------------------------------------------------------------
def unwrapped_step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
    """The class's own ``step`` without torch's wrapper: step pre-hooks never run (as under torch 2.1-2.2 after
    ``torch.compile``, or through an optimizer wrapper that bypasses them)."""
    return type(self).step.__wrapped__(self, closure)


class BypassesHooks(Masked):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = super().configure_optimizers()
        optimizer.step = types.MethodType(unwrapped_step, optimizer)
        return optimizer


def test_case09_hook_that_did_not_run_is_caught(tmp_path):
    """Test that the hook counts the steps it ran for, and a fit whose optimizer skips the step pre-hooks raises
    "did not run" before any weight changes."""
    model = Masked()
    model.batches = 6
    trainer = fit(model, tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert trainer.global_step == 3
    assert WeightDecayHook.of(trainer.optimizers[0]).steps == 3

    assert torch.optim.SGD.step.__wrapped__ is not torch.optim.SGD.step  # functools.wraps keeps the original
    model = BypassesHooks()
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"weight-decay hook of `SGD` did not run for this optimizer step"):
        fit(model, tmp_path, max_steps=2)
    assert_unchanged(model, before)


# 10 ------------------------------------------------------------------------------------------------------------
class HutchinsonSGD(torch.optim.Optimizer):
    """A second-order optimizer in AdaHessian's style: it differentiates the gradients (``backward(create_graph=True)``)
    for a Hutchinson estimate of the Hessian's diagonal, and scales its coupled-decay step by it."""

    def __init__(self, params: Any, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hessian = torch.autograd.grad([p.grad for p in params], params, grad_outputs=probes)
        diagonal = {id(p): (h * v).abs() for p, h, v in zip(params, hessian, probes, strict=True)}
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        update = (p.grad + group["weight_decay"] * p) / (diagonal[id(p)] + 1e-3)
                        p.add_(update, alpha=-group["lr"])


def test_case10_second_order_optimizer_with_masks_raises_before_changing_weights():
    """Test that a masked group whose gradients carry a graph (`backward(create_graph=True)`) raises a clear
    `RuntimeError` at the step, before any weight changes."""
    net = TanhNet()
    optimizer = HutchinsonSGD(net.parameters(), lr=0.01, weight_decay=WD)
    attach_weight_decay_hook(optimizer, {"w": torch.ones(4, 1)}, module=net, decay_style="coupled")
    before = weights(net)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net(x).pow(2).mean().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"part of an autograd graph \(`backward\(create_graph=True\)`"):
        optimizer.step()
    assert_unchanged(net, before)


# 11 ------------------------------------------------------------------------------------------------------------
class MuonLike(torch.optim.Optimizer):
    """Takes ``weight_decay`` in its constructor but not in ``defaults``, and sets it in every group, as
    ``pytorch_optimizer``'s Muon family does; decoupled decay, then a plain gradient step."""

    def __init__(self, params: Any, lr: float = 0.02, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr})
        for group in self.param_groups:
            group.setdefault("weight_decay", weight_decay)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad, alpha=-group["lr"])
        return loss


def test_case11_optimizer_with_weight_decay_outside_its_defaults_is_built(tmp_path):
    """Test that an optimizer taking `weight_decay` only in its constructor is built by the mixin, its multiplier
    group gets multiplier x base, and a fit decays by it."""
    recorder = StepRecorder()
    model = Net(functools.partial(MuonLike, lr=LR, weight_decay=WD), weight_decay_multipliers={"head.weight": 2.0})
    assert "weight_decay" not in MuonLike(model.parameters()).defaults
    trainer = fit(model, tmp_path, callbacks=[recorder])
    found = [(g["name"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups]
    assert found == [("decay", WD), ("no_decay", 0.0), ("decay_x2", 2 * WD)]

    def decoupled(wd: float) -> Any:
        return lambda w, g: w * (1 - LR * wd) - LR * g

    check_step(
        recorder,
        0,
        {
            "body.weight": decoupled(WD),
            "body.bias": decoupled(0),
            "head.weight": decoupled(2 * WD),
            "head.bias": decoupled(0),
        },
    )


# 12 ------------------------------------------------------------------------------------------------------------
LAMBD = 0.01  # ASGD's own shrink of every parameter: `p *= 1 - lambd * eta`
ASGD = functools.partial(torch.optim.ASGD, lr=LR, lambd=LAMBD, weight_decay=WD)


class AsgdBuiltByHand(Net):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return ASGD(self.parameters())


@pytest.mark.parametrize("built_by", ["mixin", "safety net"])
def test_case12_asgd_own_shrink_off_for_excluded_parameters(tmp_path, built_by):
    """Test that ASGD's own shrink (`lambd`) is 0 in `no_decay` and kept in decayed groups, so after a step the
    excluded parameters took a plain step and the decayed ones shrank (a hand-computed first ASGD step)."""
    recorder = StepRecorder()
    model = Net(ASGD) if built_by == "mixin" else AsgdBuiltByHand()
    trainer = fit(model, tmp_path, callbacks=[recorder])
    groups = trainer.optimizers[0].param_groups
    assert [(g["name"], g["lambd"], g["weight_decay"]) for g in groups] == [
        ("decay", LAMBD, WD),
        ("no_decay", 0.0, 0.0),
    ]

    def asgd(lambd: float, wd: float) -> Any:  # the first step: eta = lr
        return lambda w, g: w * (1 - lambd * LR) - LR * (g + wd * w)

    decayed, excluded = asgd(LAMBD, WD), asgd(0.0, 0.0)
    check_step(
        recorder, 0, {"body.weight": decayed, "body.bias": excluded, "head.weight": decayed, "head.bias": excluded}
    )


# 13 ------------------------------------------------------------------------------------------------------------
class LionLike(torch.optim.Optimizer):
    """lucidrains' Lion convention: ``self._init_lr`` and ``self.decoupled_wd``; with ``decoupled_wd`` the decay is
    ``p *= 1 - lr * wd / init_lr`` (independent of the lr's scale), then the sign update."""

    def __init__(
        self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        self._init_lr = lr
        self.decoupled_wd = True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            wd = wd / self._init_lr if self.decoupled_wd else wd
            for p in group["params"]:
                if p.grad is None:
                    continue
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - lr * wd)
                p.add_((exp_avg * beta1 + p.grad * (1 - beta1)).sign(), alpha=-lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class LionByHand(ShrinkByHand, LionLike):
    """``LionLike`` with its decay written out by hand (give each group ``shrink = wd / init_lr``)."""


def test_case13_independent_decay_style_recognised_and_followed(tmp_path):
    """Test that lucidrains' convention is recognised as the independent style: under an LR schedule, mask 1 decays
    exactly like the optimizer's own decay and mask 0 not at all (`1 - lr * wd / init_lr * mask`), and a declared
    `decay_style="decoupled"` is refused as a contradiction."""
    lr0, wd = 0.01, 0.02  # the optimizer's own decay: p *= 1 - lr * 2 at lr0
    own, ones, rows, reference = TanhNet(), TanhNet(), TanhNet(), TanhNet()
    mask = torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)

    def run(net: TanhNet, optimizer: torch.optim.Optimizer) -> None:
        train(net, optimizer, steps=10, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5))

    run(own, LionLike(own.parameters(), lr=lr0, weight_decay=wd))
    for net, net_mask in ((ones, torch.ones(4, 1)), (rows, mask)):
        optimizer = LionLike(net.parameters(), lr=lr0, weight_decay=wd)
        assert group_style(optimizer, 0, None) == "independent"  # recognised, not declared
        attach_weight_decay_hook(optimizer, {"w": net_mask}, module=net)
        run(net, optimizer)
    by_hand = LionByHand(
        [{"params": reference.parameters(), "shrink": wd / lr0}], masks={reference.w: mask}, lr=lr0, weight_decay=0.0
    )
    run(reference, by_hand)
    assert_close(ones.w, own.w)
    assert_close(ones.v, own.v)
    assert_close(rows.w, reference.w)
    assert_close(rows.v, reference.v)
    assert not torch.allclose(rows.w, own.w)

    net = TanhNet()
    optimizer = LionLike(net.parameters(), lr=lr0, weight_decay=wd)
    with pytest.raises(
        ValueError, match=r"`decay_style='decoupled'` contradicts `LionLike`, whose weight decay is independent"
    ):
        attach_weight_decay_hook(optimizer, {"w": mask}, module=net, decay_style="decoupled")
    assert optimizer.param_groups[0]["weight_decay"] == wd  # untouched
