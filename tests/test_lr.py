"""Learning-rate multipliers and layer-wise learning-rate decay (LLRD), against independent oracles, in real fits.

The oracle of layer decay is MAE's ``param_groups_lrd`` (``oracles.mae_param_groups_lrd``, transcribed); the
oracle of an lr rule is the rule written out by hand. Learning rates are checked step by step as ``lr / declared
multiplier``, which must give one base learning rate across all groups at every step, whatever the schedule does.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, log_lines, run_cli, state_at_train_start, trainer_kwargs
from models import NoDecayViT, RandomDataset, ViTClassifier
from oracles import assert_same_state, mae_param_groups_lrd, mae_scales, state_by_name
from pytorch_lightning.callbacks import BackboneFinetuning, LearningRateFinder, LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.tuner import Tuner
from torch import nn
from torch.optim import lr_scheduler as schedulers
from torch.utils.data import DataLoader

from lightning_nodecay import GroupRules, NoDecayBackboneFinetuning, NoDecayMixin, decide, param_groups

BASE_LR, WD, DECAY = 0.01, 0.05, 0.75
#: MAE's `param_groups_lrd` rules: no decay on 1-D parameters (biases, LayerNorm) and on `model.no_weight_decay()`.
MAE_NO_WEIGHT_DECAY = ("cls_token", "pos_embed")
MAE_RULES = GroupRules(layer_decay=DECAY, no_decay_param_names=("bias", *MAE_NO_WEIGHT_DECAY))


def no_rule(name: str) -> float:
    return 1.0


def patch_embed_x3(name: str) -> float:
    """The lr rule `{"patch_embed.**": 3.0}`, by hand."""
    return 3.0 if name.startswith("patch_embed.") else 1.0


def declared_multipliers(
    model: nn.Module, decay: float | None, rule: Callable[[str], float] = no_rule
) -> dict[int, float]:
    """``{id(param): MAE's layer scale x the lr rule}``, the oracle of every parameter's learning-rate multiplier."""
    scales = mae_scales(model, decay) if decay is not None else {}
    return {id(p): scales.get(n, 1.0) * rule(n) for n, p in model.named_parameters()}


def group_bases(groups: Iterable[dict[str, Any]], declared: dict[int, float]) -> list[float]:
    """``lr / declared multiplier`` of every group (whose parameters must share one declared multiplier)."""
    bases = []
    for group in groups:
        (multiplier,) = {declared[id(p)] for p in group["params"]}
        bases.append(group["lr"] / multiplier)
    return bases


def assert_one_base(groups: Iterable[dict[str, Any]], declared: dict[int, float]) -> float:
    """Assert that every group trains at base x its declared multiplier, with one base; return the base."""
    bases = group_bases(groups, declared)
    assert bases == pytest.approx([bases[0]] * len(bases), rel=1e-9), bases
    return bases[0]


def as_built(groups: list[dict[str, Any]], optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW):
    """``{(frozenset of parameter ids, lr, weight_decay)}`` of the groups as an optimizer built on them has them."""
    built = optimizer(groups, lr=BASE_LR, weight_decay=WD).param_groups
    assert len(built) == len(groups)
    return {(frozenset(id(p) for p in g["params"]), g["lr"], g["weight_decay"]) for g in built}


def mae_groups(model: nn.Module, decay: float = DECAY, rule: Callable[[str], float] = no_rule) -> list[dict]:
    """MAE's groups with the explicit `lr` its training loop gives them; a parameter the lr ``rule`` scales (all of a
    group's parameters or none, here) gets that factor too."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in mae_param_groups_lrd(model, WD, MAE_NO_WEIGHT_DECAY, decay):
        by_rule: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_rule.setdefault(rule(names[id(p)]), []).append(p)
        for factor, params in by_rule.items():
            lr = BASE_LR * (group["lr_scale"] * factor)  # the scale first, as MAE's `lr * lr_scale`
            groups.append({"params": params, "lr": lr, "weight_decay": group["weight_decay"]})
    return groups


class LrProbe(pl.Callback):
    """Records ``(global step, [(name, lr, params)])`` of the optimizer's groups before every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[dict[str, Any]]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        groups = [{"name": g.get("name"), "lr": g["lr"], "params": list(g["params"])} for g in optimizer.param_groups]
        self.steps.append((trainer.global_step, groups))


# -- the groups: MAE's, and lr rules ----------------------------------------------------------------


def test_layer_decay_multipliers_equal_mae():
    """Test that every parameter's lr multiplier under `layer_decay=0.75` is MAE's `lr_scale`."""
    model = ViTClassifier()
    decisions = decide(model, GroupRules(layer_decay=DECAY))
    assert {d.name: d.lr_multiplier for d in decisions} == pytest.approx(mae_scales(model, DECAY), rel=1e-12)
    assert len(decisions) == len(list(model.parameters()))


def test_layer_decay_groups_equal_mae():
    """Test that `param_groups` puts together exactly the parameters MAE's `param_groups_lrd` does, each group with
    MAE's lr (base x `lr_scale`) and weight decay, once an optimizer is built on them."""
    model = ViTClassifier()
    ours = as_built(param_groups(model, MAE_RULES, lr=BASE_LR, weight_decay=WD))
    theirs = as_built(mae_groups(model))
    assert ours == theirs
    assert len(ours) == 12  # 6 layers x (decay, no_decay)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.embed, model.body, model.norm, model.head = (
        nn.Embedding(10, 4),
        nn.Linear(4, 4),
        nn.LayerNorm(4),
        nn.Linear(4, 3),
    )
    return model


def test_lr_multipliers_head_and_embedding():
    """Test the groups of `{"head.*": 10.0, nn.Embedding: 0.5}`: names, members, lrs and weight decays."""
    model = small_model()
    groups = param_groups(
        model, GroupRules(lr_multipliers={"head.*": 10.0, nn.Embedding: 0.5}), lr=BASE_LR, weight_decay=WD
    )
    built = torch.optim.AdamW(groups, lr=BASE_LR, weight_decay=WD).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    got = [(g["name"], [names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in built]
    assert got == [
        ("decay", ["body.weight"], BASE_LR, WD),
        ("no_decay", ["body.bias", "norm.weight", "norm.bias"], BASE_LR, 0.0),
        ("decay_lr_x0.5", ["embed.weight"], pytest.approx(0.5 * BASE_LR), WD),
        ("decay_lr_x10", ["head.weight"], pytest.approx(10 * BASE_LR), WD),
        ("no_decay_lr_x10", ["head.bias"], pytest.approx(10 * BASE_LR), 0.0),
    ]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            dict(lr_multipliers={"head.*": 10.0, nn.Linear: 2.0}),
            r"`head.weight` matches two `lr_multipliers` rules, `Linear` \(x2\) and `head.\*` \(x10\)",
        ),
        (dict(lr_multipliers={"head.wieght": 10.0}), r"pattern `head.wieght` matches no .*Did you mean `head.weight`"),
    ],
)
def test_lr_multipliers_misuse_raises_naming_the_rules(rules, message):
    """Test that a parameter matched by two lr rules, or a pattern matching nothing, raises naming them."""
    with pytest.raises(ValueError, match=message):
        decide(small_model(), GroupRules(**rules))


def test_lr_multipliers_wildcard_typo_suggests_the_pattern():
    """Test that a mistyped wildcard pattern gets a "did you mean" too: `haed.*` for `head.*`."""
    with pytest.raises(ValueError, match=r"pattern `haed.\*` matches no parameter.*Did you mean `head.\*`"):
        decide(small_model(), GroupRules(lr_multipliers={"haed.*": 10.0}))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (dict(lr_multipliers={"head.*": 0}), r"`lr_multipliers\['head.\*'\]` is 0; .* > 0"),
        (dict(lr_multipliers={"head.*": -1.0}), r"`lr_multipliers\['head.\*'\]` is -1.0; .* > 0"),
        (dict(lr_multipliers={"head.*": math.inf}), r"`lr_multipliers\['head.\*'\]` is inf"),
        (dict(layer_decay=0.0), r"`layer_decay` is 0.0; it must be a float in \(0, 1\]"),
        (dict(layer_decay=1.5), r"`layer_decay` is 1.5; it must be a float in \(0, 1\]"),
        (dict(layer_decay=-0.5), r"`layer_decay` is -0.5"),
    ],
)
def test_bad_lr_rules_raise_at_group_rules(rules, message):
    """Test that a multiplier <= 0 and a layer decay outside (0, 1] are refused when the rules are built."""
    with pytest.raises(ValueError, match=message):
        GroupRules(**rules)


def test_param_groups_without_lr_raises_when_lr_multipliers_exist():
    """Test that `param_groups` needs `lr=` to resolve lr multipliers, and says so."""
    with pytest.raises(ValueError, match=r"needs the base learning rate: pass `lr=`"):
        param_groups(small_model(), GroupRules(lr_multipliers={"head.*": 10.0}), weight_decay=WD)
    with pytest.raises(ValueError, match=r"pass `lr=`"):
        param_groups(ViTClassifier(), GroupRules(layer_decay=DECAY))


# -- training: the groups against hand-written ones ----------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "rule"),
    [(MAE_RULES, no_rule), (dataclasses.replace(MAE_RULES, lr_multipliers={"patch_embed.**": 3.0}), patch_embed_x3)],
    ids=["mae", "mae+lr_rule"],
)
@pytest.mark.parametrize(
    "optimizer",
    [torch.optim.AdamW, functools.partial(torch.optim.SGD, momentum=0.9)],
    ids=["AdamW", "SGD-momentum"],
)
def test_five_steps_equal_hand_written_groups(rules, rule, optimizer):
    """Test that five float64 steps on the library's groups give exactly the weights of MAE-style hand-written groups
    (explicit `lr` and `weight_decay` per group)."""
    ours = ViTClassifier().double()
    hand = copy.deepcopy(ours)
    ours_optimizer = optimizer(param_groups(ours, rules, lr=BASE_LR, weight_decay=WD), lr=BASE_LR, weight_decay=WD)
    hand_optimizer = optimizer(mae_groups(hand, rule=rule), lr=BASE_LR, weight_decay=WD)
    x, y = next(iter(ours.train_dataloader()))
    for model, opt in ((ours, ours_optimizer), (hand, hand_optimizer)):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    moved = [
        not torch.equal(p, q) for p, q in zip(ours.parameters(), ViTClassifier().double().parameters(), strict=True)
    ]
    assert all(moved)
    for (name, p), q in zip(ours.named_parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# -- through a Trainer: schedules -------------------------------------------------------------------------


def warmup_cosine(optimizer: torch.optim.Optimizer) -> schedulers.SequentialLR:
    """Linear warm-up over 4 steps, then cosine (not reaching 0 within the tests' fits)."""
    warmup = schedulers.LinearLR(optimizer, start_factor=0.1, total_iters=4)
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=20)
    return schedulers.SequentialLR(optimizer, [warmup, cosine], milestones=[4])


def test_warmup_cosine_keeps_the_ratios_in_learning_rate_monitor(tmp_path):
    """Test, from Lightning's `LearningRateMonitor` in `metrics.csv`, that at every logged step every group's lr
    over the top layer's `decay` group's lr (multiplier 1) is the declared ratio: layer scale x lr rule."""
    model = NoDecayViT(
        batches=10,
        layer_decay=DECAY,
        lr_multipliers={"patch_embed.**": 3.0},
        lr_scheduler=warmup_cosine,
        lr_scheduler_config={"interval": "step"},
    )
    logger = CSVLogger(tmp_path, name="lr", version=0)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=10, logger=logger, callbacks=[monitor], log_every_n_steps=1)
    )
    trainer.fit(model)
    declared = declared_multipliers(model, DECAY, patch_embed_x3)
    expected = {g["name"]: declared[id(g["params"][0])] for g in trainer.optimizers[0].param_groups}
    assert expected["layer5_decay"] == 1.0
    assert len(expected) == 13  # 6 layers x (decay, no_decay), layer 0 split by the lr rule
    with open(tmp_path / "lr" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-AdamW/layer5_decay")]
    assert len(rows) == 10
    top = [float(row["lr-AdamW/layer5_decay"]) for row in rows]
    assert top[0] == pytest.approx(0.1 * BASE_LR)
    assert max(top) == pytest.approx(BASE_LR)
    for row in rows:
        ratios = {name: float(row[f"lr-AdamW/{name}"]) / float(row["lr-AdamW/layer5_decay"]) for name in expected}
        assert ratios == pytest.approx(expected, rel=1e-9)


def run_schedule(make: Callable[[torch.optim.Optimizer], Any], steps: int = 12) -> list[float]:
    """Train the ViT (layer decay 0.75, `patch_embed` x3) with scheduler ``make``, checking before every step that
    each group's lr is one base x its declared multiplier; return the bases."""
    model = ViTClassifier()
    rules = GroupRules(layer_decay=DECAY, lr_multipliers={"patch_embed.**": 3.0})
    optimizer = torch.optim.AdamW(param_groups(model, rules, lr=BASE_LR, weight_decay=WD), lr=BASE_LR, weight_decay=WD)
    scheduler = make(optimizer)
    declared = declared_multipliers(model, DECAY, patch_embed_x3)
    x, y = next(iter(model.train_dataloader()))
    bases = []
    for _ in range(steps):
        bases.append(assert_one_base(optimizer.param_groups, declared))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step(1.0) if isinstance(scheduler, schedulers.ReduceLROnPlateau) else scheduler.step()
    return bases


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda o: schedulers.CosineAnnealingLR(o, T_max=16),
            [BASE_LR * (1 + math.cos(math.pi * t / 16)) / 2 for t in range(12)],
        ),
        (lambda o: schedulers.LambdaLR(o, lambda t: 1 / (1 + t)), [BASE_LR / (1 + t) for t in range(12)]),
        (
            warmup_cosine,
            [BASE_LR * (0.1 + 0.9 * t / 4) for t in range(4)]
            + [BASE_LR * (1 + math.cos(math.pi * t / 20)) / 2 for t in range(8)],
        ),
        # a metric that never improves: the lr halves after every step but the first; min_lr=0 keeps the ratios
        (
            lambda o: schedulers.ReduceLROnPlateau(o, factor=0.5, patience=0),
            [BASE_LR] * 2 + [BASE_LR * 0.5**t for t in range(1, 11)],
        ),
        (
            lambda o: schedulers.OneCycleLR(
                o, max_lr=[BASE_LR * g["lr_multiplier"] for g in o.param_groups], total_steps=12
            ),
            None,
        ),
    ],
    ids=["CosineAnnealingLR", "LambdaLR", "LinearLR+SequentialLR", "ReduceLROnPlateau", "OneCycleLR-per-group"],
)
def test_each_scheduler_keeps_the_ratios(make, expected):
    """Test that each scheduler moves every group's lr by the same factor, step after step, following its schedule."""
    bases = run_schedule(make)
    if expected is not None:
        assert bases == pytest.approx(expected, rel=1e-9)
    else:  # OneCycleLR: warms up to the max, then anneals
        assert bases[0] == pytest.approx(BASE_LR / 25)
        assert max(bases) == pytest.approx(BASE_LR, rel=0.05)
    assert len(set(bases)) > 3  # the schedule moved the learning rates


class PlateauViT(NoDecayViT):
    """Logs a metric that never improves, so `ReduceLROnPlateau(patience=0)` reduces the lr after every epoch but the
    first."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.log("plateau", 1.0, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_reduce_on_plateau_min_lr_floor_refused_before_the_step(tmp_path):
    """Test that `ReduceLROnPlateau` with one scalar `min_lr` is refused at the first step after the floor caught a
    group, not before: layer decay 0.5, base 0.01, smallest group 0.01 / 32 = 3.1e-4; `min_lr=1e-4` holds it after the
    second reduction (end of epoch 2), so steps 1 to 6 run and step 7 is refused."""
    model = PlateauViT(
        batches=2,
        layer_decay=0.5,
        lr_scheduler=functools.partial(schedulers.ReduceLROnPlateau, factor=0.5, patience=0, min_lr=1e-4),
        lr_scheduler_config={"monitor": "plateau"},
    )
    probe = LrProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=20, callbacks=[probe]))
    with pytest.raises(
        ValueError, match=r"no longer train at their declared learning-rate ratios.*`ReduceLROnPlateau`"
    ):
        trainer.fit(model)
    assert trainer.global_step == 6
    assert len(probe.steps) == 7  # the probe saw step 7's groups; the invariant refused them before its update
    declared = declared_multipliers(model, 0.5)
    bases = [assert_one_base(groups, declared) for _, groups in probe.steps[:-1]]
    assert bases == pytest.approx([BASE_LR] * 4 + [BASE_LR / 2] * 2)
    lrs = sorted(g["lr"] for g in trainer.optimizers[0].param_groups)
    assert lrs[0] == 1e-4
    assert lrs[2] == pytest.approx(BASE_LR / 16 / 4)


def test_one_cycle_single_max_lr_refused_before_the_first_step(tmp_path):
    """Test that `OneCycleLR` with one `max_lr` (which gives every group the same lr) is refused before any step."""
    model = NoDecayViT(
        layer_decay=DECAY,
        lr_scheduler=functools.partial(schedulers.OneCycleLR, max_lr=BASE_LR, total_steps=8),
        lr_scheduler_config={"interval": "step"},
    )
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8))
    with pytest.raises(ValueError, match=r"`OneCycleLR` with one `max_lr`"):
        trainer.fit(model)
    assert trainer.global_step == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_one_cycle_max_lr_per_group_keeps_the_ratios_over_a_fit(tmp_path):
    """Test that `OneCycleLR` with one `max_lr` per group (base x `lr_multiplier`) trains a whole fit at the ratios."""

    def one_cycle(optimizer: torch.optim.Optimizer) -> schedulers.OneCycleLR:
        max_lr = [BASE_LR * g["lr_multiplier"] for g in optimizer.param_groups]
        return schedulers.OneCycleLR(optimizer, max_lr=max_lr, total_steps=8)

    model = NoDecayViT(layer_decay=DECAY, lr_scheduler=one_cycle, lr_scheduler_config={"interval": "step"})
    probe = LrProbe()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[probe])).fit(model)
    declared = declared_multipliers(model, DECAY)
    bases = [assert_one_base(groups, declared) for _, groups in probe.steps]
    assert len(bases) == 8
    assert bases[0] == pytest.approx(BASE_LR / 25)
    assert max(bases) == pytest.approx(BASE_LR, rel=0.2)


def test_cosine_with_a_shared_eta_min_refused_at_the_step_that_breaks_the_ratios(tmp_path):
    """Test `CosineAnnealingLR(eta_min=...)`: one floor for every group (`eta_min + (lr - eta_min) * ...`) breaks the
    ratios from its first step on; the first step (still at the base lrs) runs, the second is refused. A floor as a
    factor of each group's lr (`LambdaLR`) keeps them."""
    model = NoDecayViT(
        layer_decay=DECAY,
        lr_scheduler=functools.partial(schedulers.CosineAnnealingLR, T_max=8, eta_min=1e-4),
        lr_scheduler_config={"interval": "step"},
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8))
    with pytest.raises(ValueError, match=r"no longer train at their declared learning-rate ratios"):
        trainer.fit(model)
    assert trainer.global_step == 1


# -- Lightning's tuner ------------------------------------------------------------------------------------


class TunableViT(NoDecayMixin, ViTClassifier):
    """The ViT with layer decay whose optimizer follows `self.lr`, the attribute `lr_find` sets: `optimizer` is a
    property, so every `configure_optimizers` (the tuner's and the fit's) builds AdamW at the current `self.lr`.
    Records the groups' lrs before every optimizer step in `seen` (a module hook: `lr_find` replaces the Trainer's
    callbacks with its own while it sweeps)."""

    layer_decay = DECAY

    def __init__(self) -> None:
        super().__init__(batches=40)
        self.lr = 1e-3
        self.seen: list[list[float]] = []

    @property
    def optimizer(self) -> Callable[[Any], torch.optim.Optimizer]:  # type: ignore[override]
        return functools.partial(torch.optim.AdamW, lr=self.lr, weight_decay=WD)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append([g["lr"] for g in optimizer.param_groups])


def test_lr_find_then_fit_keeps_the_ratios(tmp_path):
    """Test `Tuner.lr_find` on a mixin model with layer decay: it returns a suggestion, and the fit afterwards trains
    every group at the suggestion x its declared multiplier at every step.

    What `lr_find` does to the groups: it sets every group's `lr` (and `initial_lr`) to `min_lr`, then sweeps them
    all alike to `max_lr`, so the sweep runs WITHOUT layer decay (one lr for every layer); it never calls the mixin's
    fit-start callback (the tuner exits the fit from its own `on_fit_start`, which runs first), so the invariant is not
    checked during the sweep. Afterwards it restores the checkpoint it took and sets `model.lr`; the fit then builds a
    new optimizer from `self.lr`, with the declared ratios."""
    model = TunableViT()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5))
    result = Tuner(trainer).lr_find(model, min_lr=1e-5, max_lr=1.0, num_training=30, early_stop_threshold=None)
    suggestion = result.suggestion()
    assert suggestion is not None
    assert model.lr == suggestion
    sweep, model.seen = model.seen, []
    assert len(sweep) == 30
    assert all(len(set(lrs)) == 1 for lrs in sweep)  # the sweep: every group at one lr
    assert sweep[0][0] == pytest.approx(1e-5)
    assert sweep[-1][0] == pytest.approx(1.0)
    probe = LrProbe()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, callbacks=[probe]))
    trainer.fit(model)
    declared = declared_multipliers(model, DECAY)
    assert [assert_one_base(groups, declared) for _, groups in probe.steps] == [suggestion] * 5
    assert len({lr for lr in model.seen[0]}) == 6  # one lr per layer


def test_learning_rate_finder_callback_in_the_fit_keeps_the_ratios_or_is_refused(tmp_path):
    """Test Lightning's `LearningRateFinder` as a callback of the fit itself: either the fit's steps train at the
    declared ratios, or the fit is refused before its first step. Lightning 2.6 sets every group of the running
    optimizer to the suggestion after the sweep (`pg["lr"] = lr`), flattening the layer decay: refused; Lightning
    2.4 leaves the groups' own learning rates: the ratios hold."""
    model = TunableViT()
    finder = LearningRateFinder(min_lr=1e-5, max_lr=1.0, num_training_steps=30, early_stop_threshold=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=35, callbacks=[finder]))
    refused = None
    try:
        trainer.fit(model)
    except ValueError as error:
        refused = str(error)
    if refused is not None:
        assert "no longer train at their declared learning-rate ratios" in refused
        assert len(model.seen) == 30  # the sweep's steps only
        assert trainer.global_step == 0  # restored from the finder's checkpoint; no step of the fit
        return
    fit_steps = model.seen[30:]
    assert fit_steps
    for lrs in fit_steps:  # one lr per layer, at the declared ratios
        top = max(lrs)
        assert sorted({round(lr / top, 9) for lr in lrs}) == sorted({round(DECAY**k, 9) for k in range(6)})


# -- LightningCLI ----------------------------------------------------------------------------------------


class CLIViT(NoDecayMixin, ViTClassifier):
    """The ViT with its optimizer and rules injected by LightningCLI."""

    def __init__(
        self,
        optimizer: Callable[[Any], torch.optim.Optimizer] = torch.optim.AdamW,
        group_rules: GroupRules | None = None,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.group_rules = group_rules


def test_cli_yaml_sets_lr_multipliers_and_layer_decay(tmp_path):
    """Test that `group_rules` from a YAML config (a pattern and a module class as `lr_multipliers` keys, a layer
    decay) give every group base x layer scale x lr rule."""
    config = tmp_path / "config.yaml"
    config.write_text(
        """
model:
  optimizer:
    class_path: torch.optim.AdamW
    init_args:
      lr: 0.01
      weight_decay: 0.05
  group_rules:
    layer_decay: 0.5
    lr_multipliers:
      "head.*": 10.0
      torch.nn.Conv2d: 3.0
"""
    )
    cli = run_cli(CLIViT, tmp_path, f"--config={config}")
    assert cli.model.group_rules.lr_multipliers == {"head.*": 10.0, nn.Conv2d: 3.0}

    def rule(name: str) -> float:
        return 10.0 if name.startswith("head.") else 3.0 if name.startswith("patch_embed.") else 1.0

    declared = declared_multipliers(cli.model, 0.5, rule)
    groups = cli.trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([BASE_LR * declared[id(g["params"][0])] for g in groups])
    assert_one_base(groups, declared)
    assert {g["weight_decay"] for g in groups} == {0.0, WD}


# -- resume, fine-tuning, summary ---------------------------------------------------------------------------

GAMMA = 0.9


def resume_model(**declarations: Any) -> NoDecayViT:
    """One step per epoch; a closed-form schedule (computed from the scheduler's `base_lrs`), lr x 0.9 every step."""
    scheduler = functools.partial(schedulers.LambdaLR, lr_lambda=functools.partial(pow, GAMMA))
    return NoDecayViT(batches=1, lr_scheduler=scheduler, lr_scheduler_config={"interval": "step"}, **declarations)


@pytest.mark.parametrize(
    ("declarations", "rule", "moved"),
    [
        ({}, no_rule, None),  # the same group names: no remap, the lrs are rescaled in place
        (  # layer 0 split by an lr rule: remapped by name, new groups continuing `layer0_decay` / `layer0_no_decay`
            {"lr_multipliers": {"patch_embed.**": 3.0}},
            patch_embed_x3,
            "new group `layer0_decay_lr_x0.7119140625` continues the hyperparameters of saved group `layer0_decay`",
        ),
    ],
    ids=["same-layout", "remapped"],
)
def test_resume_with_another_layer_decay_follows_the_new_ratios(tmp_path, nodecay_log, declarations, rule, moved):
    """Test a resume with `layer_decay` 0.5 -> 0.75 (remap, the default): each parameter keeps its saved optimizer
    state, and every group continues the schedule at base x its NEW multiplier, the scheduler's `base_lrs` too."""
    saving = resume_model(layer_decay=0.5)
    saving_trainer = fit_with_checkpoints(tmp_path / "a", saving, max_steps=2)
    saved_state = state_by_name(saving_trainer.optimizers[0], saving)
    resumed = resume_model(layer_decay=DECAY, **declarations)
    probe, at_start = LrProbe(), state_at_train_start()
    checkpoint = tmp_path / "a" / "epoch=1-step=2.ckpt"
    trainer = fit_with_checkpoints(
        tmp_path / "b", resumed, max_steps=5, ckpt_path=checkpoint, callbacks=[probe, at_start]
    )
    assert trainer.global_step == 5
    assert_same_state(at_start.state, saved_state)
    declared = declared_multipliers(resumed, DECAY, rule)
    bases = [assert_one_base(groups, declared) for _, groups in probe.steps]
    assert [step for step, _ in probe.steps] == [2, 3, 4]
    assert bases == pytest.approx([BASE_LR * GAMMA**step for step in (2, 3, 4)], rel=1e-9)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    groups = scheduler.optimizer.param_groups
    scheduled = [{"lr": lr, "params": g["params"]} for lr, g in zip(scheduler.base_lrs, groups, strict=True)]
    assert group_bases(scheduled, declared) == pytest.approx([BASE_LR] * len(groups))
    if moved is not None:
        assert any(moved in line for line in log_lines(nodecay_log, "NoDecayMixin resume"))


class FinetuneModel(NoDecayMixin, pl.LightningModule):
    """A `backbone` (an `embed` Linear and two blocks) and a `head`; AdamW(lr=0.01, weight_decay=0.05)."""

    def __init__(self, **declarations: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Module()
        self.backbone.embed = nn.Linear(8, 8)
        self.backbone.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2))
        self.head = nn.Linear(8, 2)
        self.optimizer = functools.partial(torch.optim.AdamW, lr=BASE_LR, weight_decay=WD)
        for name, value in declarations.items():
            setattr(self, name, value)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = self.backbone.embed(batch)
        for block in self.backbone.blocks:
            x = block(x)
        return self.head(x).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(8, 4), batch_size=4)  # one step per epoch


#: The layers of `FinetuneModel` by hand: embed 0, blocks 1 and 2, head 3.
FINETUNE_LAYERS = {"backbone.embed.": 0, "backbone.blocks.0.": 1, "backbone.blocks.1.": 2, "head.": 3}


@pytest.mark.parametrize(
    ("declarations", "rule"),
    [
        (
            {"lr_multipliers": {"backbone.embed.*": 0.5}},
            lambda name: 0.5 if name.startswith("backbone.embed.") else 1.0,
        ),
        (
            {"layer_decay": 0.5},
            lambda name: next(0.5 ** (3 - i) for p, i in FINETUNE_LAYERS.items() if name.startswith(p)),
        ),
        (
            {"layer_decay": 0.5, "lr_multipliers": {"backbone.blocks.1.*.weight": 4.0}},
            lambda name: (
                next(0.5 ** (3 - i) for p, i in FINETUNE_LAYERS.items() if name.startswith(p))
                * (4.0 if re.fullmatch(r"backbone\.blocks\.1\.\d\.weight", name) else 1.0)
            ),
        ),
    ],
    ids=["lr_multipliers", "layer_decay", "both"],
)
def test_backbone_finetuning_unfrozen_groups_keep_their_multipliers(tmp_path, declarations, rule):
    """Test `NoDecayBackboneFinetuning` with lr rules on the backbone: at every step after the unfreeze, each backbone
    group trains at Lightning's backbone lr x its declared multiplier, and the head's groups at 0.01 x theirs.

    Lightning's `BackboneFinetuning` schedule, one step per epoch: frozen in epoch 0; at the unfreeze (epoch 1) the
    backbone lr is 0.1 x the first group's lr (0.001); then it doubles every epoch (`multiplicative`: 2.0) until it
    would pass the first group's lr, which it then equals (`should_align`): 0.001, 0.002, 0.004, 0.008, 0.01."""
    model = FinetuneModel(**declarations)
    probe = LrProbe()
    finetuning = NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[finetuning, probe])).fit(model)
    declared = {id(p): rule(n) for n, p in model.named_parameters()}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert [step for step, _ in probe.steps] == list(range(6))
    backbone_bases = []
    for step, groups in probe.steps:
        head = [g for g in groups if not backbone & {id(p) for p in g["params"]}]
        assert assert_one_base(head, declared) == pytest.approx(BASE_LR)
        unfrozen = [g for g in groups if g not in head]
        if step == 0:
            assert unfrozen == []  # the backbone is frozen
            continue
        assert {id(p) for g in unfrozen for p in g["params"]} == backbone
        backbone_bases.append(assert_one_base(unfrozen, declared))
    assert backbone_bases == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.01], rel=1e-9)


def test_lightning_backbone_finetuning_refused_with_lr_multipliers(tmp_path):
    """Test Lightning's own `BackboneFinetuning`: one group for the whole backbone, refused before it trains."""
    model = FinetuneModel(layer_decay=0.5)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=3, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    )
    with pytest.raises(ValueError, match=r"NoDecayBackboneFinetuning"):
        trainer.fit(model)
    assert trainer.global_step == 1


def test_fit_start_summary_shows_lr_and_every_layer(tmp_path, nodecay_log):
    """Test that the logged fit-start summary has the `LR` and `Learning rate` columns and one line per layer."""
    model = NoDecayViT(layer_decay=0.5, lr_multipliers={"head.*": 10.0})
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(model)
    (summary,) = log_lines(nodecay_log, "Weight decay groups of `NoDecayViT`")
    header = summary.splitlines()[1]
    assert re.search(r"\| LR +\| Learning rate +\|", header)
    assert re.search(r"layer5_decay +\| x1 +\| 0\.05 +\| x10 +\| 0\.1 ", summary)
    assert re.search(r"layer0_no_decay +\| x0 +\| 0 +\| x0\.03125 +\| 0\.0003125 ", summary)
    sources = ["before `blocks`", *(f"block `blocks.{i}`" for i in range(4))]
    for layer, source in enumerate(sources):
        assert f"lr x{0.5 ** (5 - layer):.4g}: layer {layer} of 6 ({source}): " in summary
    assert "lr x1: layer 5 of 6 (after `blocks`): 2 tensors (norm.weight, norm.bias)" in summary
    assert "lr x10: layer 5 of 6 (after `blocks`), lr rule `head.*`: 2 tensors (head.weight, head.bias)" in summary
