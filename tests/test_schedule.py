"""`WeightDecayScheduler` through real fits: each step's weight decay against DINO's `cosine_scheduler` and
hand-written oracles (the values the optimizer really used, read after its update), masks and L1 through the hook,
gradient accumulation, epochs, fine-tuning, bit-identical resume, raw loops, several optimizers, LightningCLI,
the invariant, and bad input."""

from __future__ import annotations

import csv
import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, run_cli, state_at_train_start, trainer_kwargs
from models import RandomDataset, TwoLayerModel, tanh_mlp
from oracles import assert_same_training, dino_cosine_scheduler
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import (
    GroupRules,
    NoDecayBackboneFinetuning,
    NoDecayMixin,
    WeightDecayScheduler,
    param_groups,
)

#: DINO's weight-decay schedule (`--weight_decay 0.04 --weight_decay_end 0.4`).
START, END = 0.04, 0.4
#: Equal up to the last bits of `numpy.cos` against `math.cos` (as in `test_schedules.py`).
EXACT = {"rel": 1e-12, "abs": 1e-15}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def linear_by_hand(step, start, end, total):
    """A line from `start` (step 0) to `end` (step `total`), then `end`."""
    return start + (end - start) * min(step, total) / total


class Net(NoDecayMixin, pl.LightningModule):
    """`backbone` (Linear, LayerNorm) and `head` (Linear); AdamW(lr=0.01, weight_decay=0.1) unless told otherwise;
    `batches` batches of 4 per epoch. Groups: `decay`, `no_decay` and `decay_x2` (the head's weight)."""

    weight_decay_multipliers = {"head.weight": 2.0}  # noqa: RUF012

    def __init__(self, batches=4, optimizer=None, **declarations):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)
        self.batches = batches
        self.optimizer = optimizer or functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
        for name, value in declarations.items():
            setattr(self, name, value)

    def training_step(self, batch, batch_idx):
        return (self.head(torch.tanh(self.backbone(batch))) - 1).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(RandomDataset(8, 4 * self.batches), batch_size=4)


MULTIPLIERS = {"decay": 1.0, "no_decay": 0.0, "decay_x2": 2.0}


class Recorder(pl.Callback):
    """Records, after every optimizer step, the weight decay each group really had for that step's update: its
    `weight_decay` and `hook_weight_decay` (`None` when absent), read in a step post-hook, `{name: (wd, hook)}` per
    step, per optimizer."""

    def __init__(self):
        self.steps = []  # per optimizer: a list of {group name: (weight_decay, hook_weight_decay)}
        self._handles = []

    def on_train_start(self, trainer, pl_module):
        self.steps = [[] for _ in trainer.optimizers]
        for index, optimizer in enumerate(trainer.optimizers):
            self._handles.append(optimizer.register_step_post_hook(functools.partial(self._record, index)))

    def _record(self, index, optimizer, args, kwargs):
        groups = {g["name"]: (g["weight_decay"], g.get("hook_weight_decay")) for g in optimizer.param_groups}
        self.steps[index].append(groups)

    def on_train_end(self, trainer, pl_module):
        for handle in self._handles:
            handle.remove()

    def decays(self, name, index=0):
        """The weight decay of group `name` at each step (`weight_decay`, or the hook's for a hooked group)."""
        return [wd if hook is None else hook for wd, hook in (step[name] for step in self.steps[index] if name in step)]


def fit(tmp_path, model, *callbacks, **overrides):
    kwargs = trainer_kwargs(tmp_path, **{"max_steps": -1, **overrides})
    trainer = pl.Trainer(**kwargs, callbacks=list(callbacks))
    trainer.fit(model)
    return trainer


# -- DINO ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total_steps", [12, None], ids=["total_steps", "from_trainer"])
def test_cosine_every_step_equals_dino_cosine_scheduler_times_multiplier(tmp_path, total_steps):
    """Test a fit of 3 epochs of 4 steps, DINO's cosine 0.04 -> 0.4 after a 1-epoch warm-up: at every optimizer step
    each group's weight decay is DINO's `cosine_scheduler` x its multiplier, and `no_decay` exactly 0 (the length
    given, or taken from the Trainer)."""
    scheduler = WeightDecayScheduler("cosine", start=START, end=END, warmup_steps=4, total_steps=total_steps)
    recorder = Recorder()
    fit(tmp_path, Net(batches=4), scheduler, recorder, max_epochs=3)
    dino = dino_cosine_scheduler(START, END, epochs=3, niter_per_ep=4, warmup_epochs=1)
    assert len(recorder.steps[0]) == 12
    for name, multiplier in MULTIPLIERS.items():
        expected = [float(value) * multiplier for value in dino]
        assert recorder.decays(name) == pytest.approx(expected, **EXACT), name
    assert recorder.decays("no_decay") == [0.0] * 12  # exactly
    assert all(hook is None for step in recorder.steps[0] for _, hook in step.values())
    assert scheduler.state_dict() == {"steps": [12]}


# -- masks and L1 through the hook ---------------------------------------------------------------------------------

MASK = torch.tensor([[1.0], [0.0], [0.5], [1.0], [0.0], [2.0], [1.0], [1.0]])  # one value per row of backbone.0


class MaskedNet(Net):
    """`Net` with a per-row mask on `backbone.0.weight` (a hooked `decay` group) and L1 on the head's weight
    (`decay_x2_l1`); plain SGD, so one step is `p -= lr * (grad + wd * mask * p)` (L2) or `wd * sign(p)` (L1)."""

    weight_decay_l1 = ("head.weight",)

    def weight_decay_masks(self):
        return {"backbone.0.weight": MASK}


class StepByHand(pl.Callback):
    """Before each step (after the scheduler), the weights and gradients; after it, the weights."""

    def __init__(self):
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        groups = {g["name"]: dict(g) for g in optimizer.param_groups}
        params = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()}
        self.before.append((groups, params))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_masked_and_l1_groups_scheduled_through_the_hook(tmp_path):
    """Test that masked and L1 groups get the scheduled value as `hook_weight_decay` (their `weight_decay` stays
    0), and that the hook decays by it: every step's weights equal one SGD step by hand."""
    lr, start, end, total = 0.1, 0.1, 0.5, 4
    scheduler = WeightDecayScheduler("linear", start=start, end=end, total_steps=total)
    by_hand, recorder = StepByHand(), Recorder()
    model = MaskedNet(optimizer=functools.partial(torch.optim.SGD, lr=lr, weight_decay=0.3))
    fit(tmp_path, model, scheduler, by_hand, recorder, max_steps=total + 1)

    for step, ((groups, params), after) in enumerate(zip(by_hand.before, by_hand.after, strict=True)):
        base = linear_by_hand(step, start, end, total)
        assert (groups["decay"]["weight_decay"], groups["decay"]["hook_weight_decay"]) == (0.0, pytest.approx(base))
        assert groups["decay_x2_l1"]["weight_decay"] == 0.0
        assert groups["decay_x2_l1"]["hook_weight_decay"] == pytest.approx(2 * base)
        assert groups["no_decay"]["weight_decay"] == 0.0
        p, grad = params["backbone.0.weight"]
        torch.testing.assert_close(after["backbone.0.weight"], p - lr * (grad + base * MASK * p))
        p, grad = params["head.weight"]
        torch.testing.assert_close(after["head.weight"], p - lr * (grad + 2 * base * torch.sign(p)))
        p, grad = params["backbone.0.bias"]
        torch.testing.assert_close(after["backbone.0.bias"], p - lr * grad)
    assert recorder.decays("decay") == pytest.approx([linear_by_hand(s, start, end, total) for s in range(total + 1)])


# -- gradient accumulation, epochs ---------------------------------------------------------------------------------


def test_gradient_accumulation_advances_once_per_optimizer_step(tmp_path):
    """Test that with `accumulate_grad_batches=2`, 8 batches are 4 optimizer steps: the schedule's length is 4 and it
    advances once per optimizer step."""
    scheduler = WeightDecayScheduler("linear", start=0.1, end=0.5)
    recorder = Recorder()
    fit(tmp_path, Net(batches=8), scheduler, recorder, max_epochs=1, accumulate_grad_batches=2)
    assert recorder.decays("decay") == pytest.approx([linear_by_hand(s, 0.1, 0.5, 4) for s in range(4)])
    assert recorder.decays("decay_x2") == pytest.approx([2 * linear_by_hand(s, 0.1, 0.5, 4) for s in range(4)])
    assert scheduler.state_dict() == {"steps": [4]}


def test_epoch_interval_sets_each_epoch_and_logs_it(tmp_path):
    """Test `interval="epoch"`: every step of epoch e has base(e), over `max_epochs`; logged once per epoch."""
    scheduler = WeightDecayScheduler("linear", start=0.1, end=0.4, interval="epoch")
    recorder = Recorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    fit(tmp_path, Net(batches=2), scheduler, recorder, max_epochs=4, logger=logger, log_every_n_steps=50)
    per_epoch = [linear_by_hand(e, 0.1, 0.4, 4) for e in range(4)]
    assert recorder.decays("decay") == pytest.approx([v for v in per_epoch for _ in range(2)])
    assert recorder.decays("decay_x2") == pytest.approx([2 * v for v in per_epoch for _ in range(2)])
    rows = read_csv(Path(logger.log_dir) / "metrics.csv", "weight_decay/decay")
    assert rows == [(2 * e, pytest.approx(v)) for e, v in enumerate(per_epoch)]  # at each epoch's start


def read_csv(path, column):
    with open(path) as file:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(file) if row.get(column)]


# -- fine-tuning ---------------------------------------------------------------------------------------------------


def test_groups_added_by_backbone_finetuning_follow_the_schedule(tmp_path):
    """Test that the groups `NoDecayBackboneFinetuning` adds at epoch 1 get base(t) x their multiplier from their
    first step on, like the groups built at fit start."""
    scheduler = WeightDecayScheduler("cosine", start=START, end=END, warmup_steps=2)
    recorder = Recorder()
    model = Net(batches=3, weight_decay_multipliers={"head.weight": 2.0, "backbone.0.weight": 3.0})
    fit(tmp_path, model, NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1), scheduler, recorder, max_epochs=3)
    dino = dino_cosine_scheduler(START, END, epochs=9, niter_per_ep=1, warmup_epochs=2)  # 9 steps, a 2-step warm-up
    steps = recorder.steps[0]
    assert [sorted(s) for s in (steps[2], steps[3])] == [
        ["decay_x2", "no_decay"],
        ["backbone_decay_x3", "backbone_no_decay", "decay_x2", "no_decay"],
    ]
    multipliers = {"decay_x2": 2.0, "no_decay": 0.0, "backbone_decay_x3": 3.0, "backbone_no_decay": 0.0}
    for name, multiplier in multipliers.items():
        first = 3 if name.startswith("backbone") else 0
        expected = [float(value) * multiplier for value in dino[first:]]
        assert recorder.decays(name) == pytest.approx(expected, **EXACT), name


# -- resume --------------------------------------------------------------------------------------------------------


class PlainNet(pl.LightningModule):
    """`Net`'s layers without the mixin: one hand-built AdamW group (no multiplier) and a `no_decay` one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, 2)

    training_step = Net.training_step

    def train_dataloader(self):
        return DataLoader(RandomDataset(8, 4), batch_size=4)  # one step per epoch: each checkpoint is mid-schedule

    def configure_optimizers(self):
        weights = [self.backbone[0].weight, self.head.weight]
        rest = [p for p in self.parameters() if all(p is not w for w in weights)]
        groups = [{"params": weights, "name": "decay"}, {"params": rest, "weight_decay": 0.0, "name": "no_decay"}]
        return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)


RESUMED_SCHEDULES = {
    "cosine": functools.partial(WeightDecayScheduler, "cosine", end=END, warmup_steps=1),
    "callable": functools.partial(WeightDecayScheduler, lambda step: 0.1 * (1 + step) ** 0.5),
}


@pytest.mark.parametrize(
    ("model_class", "schedule"),
    [(functools.partial(Net, batches=1), "cosine"), (PlainNet, "cosine"), (PlainNet, "callable")],
    ids=["mixin-cosine", "plain-cosine", "plain-callable"],
)
def test_resume_mid_schedule_is_bit_identical(tmp_path, model_class, schedule):
    """Test that resuming from a mid-schedule checkpoint ends with exactly the weights and optimizer state of an
    uninterrupted run, every resumed step at the same weight decay (a mixin model, whose groups come back with the
    code's initial values; a plain model, whose groups torch restores as saved; a callable schedule); the scheduler
    sets base(t) again at train start, before the next step."""
    recorder = Recorder()
    uninterrupted = model_class()
    trainer = fit_with_checkpoints(
        tmp_path / "a", uninterrupted, 6, callbacks=[RESUMED_SCHEDULES[schedule](), recorder]
    )

    before, after, resumed_recorder = state_at_train_start(), state_at_train_start(), Recorder()
    resumed = model_class()
    ckpt = tmp_path / "a" / "epoch=2-step=3.ckpt"
    callbacks = [before, RESUMED_SCHEDULES[schedule](), after, resumed_recorder]
    resumed_trainer = fit_with_checkpoints(tmp_path / "b", resumed, 6, ckpt_path=ckpt, callbacks=callbacks)

    assert resumed_trainer.global_step == 6
    assert_same_training(resumed_trainer, resumed, trainer, uninterrupted)
    assert resumed_recorder.steps[0] == recorder.steps[0][3:]  # exactly
    if model_class is PlainNet:  # torch restores the saved groups: the values of the last step before the checkpoint
        assert [wd for _, _, wd in before.groups] == [wd for wd, _ in recorder.steps[0][2].values()]
    else:  # the library gives them the code's decision: its initial values
        assert [wd for _, _, wd in before.groups] == [0.1 * MULTIPLIERS[name] for name, _, _ in before.groups]
    # the scheduler sets base(3) at train start: the values step 3 had in the uninterrupted run
    assert [wd for _, _, wd in after.groups] == [wd for wd, _ in recorder.steps[0][3].values()]


# -- without a Trainer ---------------------------------------------------------------------------------------------


def raw_loop(net, optimizer, scheduler, steps, seed):
    """`steps` steps of a float64 `(6 -> 3)` net: `scheduler.step()` right before each `optimizer.step()`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        optimizer.zero_grad()
        (net(x) - 1).pow(2).mean().backward()
        scheduler.step()
        optimizer.step()


def raw_setup(**schedule):
    net = tanh_mlp()
    rules = GroupRules(weight_decay_multipliers={"2.weight": 2.0})
    optimizer = torch.optim.AdamW(param_groups(net, rules, weight_decay=0.1), lr=0.01, weight_decay=0.1)
    return net, optimizer, WeightDecayScheduler("cosine", end=END, total_steps=10, optimizers=[optimizer], **schedule)


def test_plain_object_in_a_raw_loop_follows_the_schedule(tmp_path):
    """Test the scheduler without a Trainer: `step()` before each `optimizer.step()` gives every group
    base(step) x its multiplier, starting from the optimizer's weight decay; no logging needed."""
    net, optimizer, scheduler = raw_setup(warmup_steps=2)
    seen = []
    optimizer.register_step_post_hook(lambda o, a, k: seen.append([g["weight_decay"] for g in o.param_groups]))
    raw_loop(net, optimizer, scheduler, 10, seed=1)
    dino = dino_cosine_scheduler(0.1, END, epochs=10, niter_per_ep=1, warmup_epochs=2)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "decay_x2"]
    assert seen == [pytest.approx([float(v), 0.0, 2 * float(v)], **EXACT) for v in dino]
    assert scheduler.value(3) == pytest.approx(float(dino[3]), **EXACT)


def test_plain_object_state_dict_round_trip_continues_the_schedule(tmp_path):
    """Test that saving the scheduler, optimizer and weights after 4 of 10 steps and loading them into fresh objects
    (the scheduler built before the optimizer's state is loaded) ends exactly where an uninterrupted loop does."""
    net, optimizer, scheduler = raw_setup()
    raw_loop(net, optimizer, scheduler, 4, seed=1)
    saved = {
        "net": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(saved, tmp_path / "state.pt")
    raw_loop(net, optimizer, scheduler, 6, seed=2)

    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    net2, optimizer2, scheduler2 = raw_setup()
    net2.load_state_dict(loaded["net"])
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    assert scheduler2.state_dict() == {"steps": [4]}
    raw_loop(net2, optimizer2, scheduler2, 6, seed=2)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert optimizer2.param_groups[0]["weight_decay"] == optimizer.param_groups[0]["weight_decay"]
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(float(dino_cosine_scheduler(0.1, END, 10, 1)[9]))


# -- several optimizers --------------------------------------------------------------------------------------------


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: AdamW on `a` steps every batch, SGD on `b` every other batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a, self.b = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)), nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward((self.b(torch.tanh(self.a(batch))) - 1).pow(2).mean())
        first.step()
        if batch_idx % 2 == 0:
            second.step()

    def train_dataloader(self):
        return DataLoader(RandomDataset(8, 32), batch_size=4)  # 8 batches

    def configure_optimizers(self):
        return (
            torch.optim.AdamW(param_groups(self.a), lr=0.01, weight_decay=0.05),
            torch.optim.SGD(param_groups(self.b), lr=0.01, weight_decay=0.05),
        )


def test_several_optimizers_each_follow_the_schedule_with_its_own_steps(tmp_path):
    """Test two optimizers under manual optimization: each gets base(its own step count), logged per optimizer."""
    scheduler = WeightDecayScheduler("linear", start=0.1, end=0.5, total_steps=8)
    recorder = Recorder()
    logger = pl.loggers.CSVLogger(tmp_path)
    fit(tmp_path, TwoOptimizers(), scheduler, recorder, max_epochs=1, logger=logger, log_every_n_steps=1)
    assert recorder.decays("decay", 0) == pytest.approx([linear_by_hand(s, 0.1, 0.5, 8) for s in range(8)])
    assert recorder.decays("decay", 1) == pytest.approx([linear_by_hand(s, 0.1, 0.5, 8) for s in range(4)])
    assert recorder.decays("no_decay", 0) == [0.0] * 8
    assert scheduler.state_dict() == {"steps": [8, 4]}
    metrics = Path(logger.log_dir) / "metrics.csv"
    assert [v for _, v in read_csv(metrics, "weight_decay/AdamW/decay")] == recorder.decays("decay", 0)
    assert [v for _, v in read_csv(metrics, "weight_decay/SGD/decay")] == recorder.decays("decay", 1)
    assert [s for s, _ in read_csv(metrics, "weight_decay/SGD/decay")] == [0, 2, 4, 6]


# -- LightningCLI --------------------------------------------------------------------------------------------------


def test_lightning_cli_yaml_configures_the_scheduler(tmp_path):
    """Test a LightningCLI run with the scheduler under `trainer.callbacks` in a YAML config."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_nodecay.WeightDecayScheduler\n"
        "      init_args:\n"
        "        schedule: cosine\n"
        "        end: 0.4\n"
        "        warmup_steps: 1\n"
    )
    cli = run_cli(
        TwoLayerModel,
        tmp_path,
        f"--config={config}",
        "--model.optimizer=AdamW",
        "--model.optimizer.weight_decay=0.04",
        max_steps=4,
    )
    [scheduler] = [c for c in cli.trainer.callbacks if isinstance(c, WeightDecayScheduler)]
    assert (scheduler.schedule, scheduler.end, scheduler.warmup_steps) == ("cosine", 0.4, 1)
    assert scheduler.total_steps is None  # the length: the fit's
    assert scheduler.state_dict() == {"steps": [4]}
    dino = dino_cosine_scheduler(0.04, 0.4, epochs=4, niter_per_ep=1, warmup_epochs=1)  # length: max_steps
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        ("decay", pytest.approx(float(dino[3]), **EXACT)),
        ("no_decay", 0.0),
    ]


# -- the invariant -------------------------------------------------------------------------------------------------


class ScaleOneGroup(pl.Callback):
    """From optimizer step `at` on, doubles the weight decay of `decay_x2` only (after the scheduler set it)."""

    def __init__(self, at):
        self.at, self.seen = at, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.seen >= self.at:
            group = next(g for g in optimizer.param_groups if g["name"] == "decay_x2")
            key = "hook_weight_decay" if "hook_weight_decay" in group else "weight_decay"
            group[key] *= 2
        self.seen += 1


def test_invariant_accepts_the_schedule_at_every_step(tmp_path):
    """Test that the weight-decay invariant (on by default) lets the schedule change the base of every group at every
    step."""
    scheduler = WeightDecayScheduler("cosine", start=START, end=END, warmup_steps=3)
    recorder = Recorder()
    fit(tmp_path, Net(batches=4), scheduler, recorder, max_epochs=2)
    assert len(recorder.steps[0]) == 8
    bases = {wd for step in recorder.steps[0] for wd, _ in [step["decay"]]}
    assert len(bases) == 7  # a new base at every step, but the warm-up's last and the cosine's first: both `start`


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_invariant_catches_one_group_scaled_after_the_scheduler(tmp_path, hooked):
    """Test that one decayed group scaled alone, after the scheduler set every group, is refused, naming the groups
    (with and without the step hook of masks and L1)."""
    scheduler, recorder = WeightDecayScheduler("cosine", start=START, end=END, warmup_steps=3), Recorder()
    model = MaskedNet(weight_decay_l1=()) if hooked else Net()
    with pytest.raises(ValueError, match=r"no longer share one base weight decay: `decay` .*`decay_x2`"):
        fit(tmp_path, model, scheduler, ScaleOneGroup(at=2), recorder, max_epochs=2)
    # The invariant checks the groups once the closure has run (Lightning calls `on_before_optimizer_step`, the
    # scheduler then the culprit, inside it), right before the update: the change made at step 2 is refused at step 2.
    assert len(recorder.steps[0]) == 2


# -- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "exp"}, r"`schedule` must be 'cosine', 'linear', 'constant' or a callable .*; got 'exp'"),
        ({"schedule": "cosine", "end": 0.4, "interval": "batch"}, r"`interval` must be 'step' or 'epoch'; got 'batch'"),
        ({"schedule": "cosine"}, r"`schedule='cosine'` needs `end`, the final base weight decay"),
        ({"schedule": "linear", "start": 0.1}, r"`schedule='linear'` needs `end`"),
    ],
)
def test_bad_arguments_refused_at_construction(kwargs, message):
    """Test that an unknown schedule or interval, or a cosine or linear schedule without `end`, is refused."""
    with pytest.raises(ValueError, match=message):
        WeightDecayScheduler(**kwargs)


def test_callable_returning_a_negative_value_named_with_its_step(tmp_path):
    """Test that a callable schedule's negative value stops the fit before that step, naming the step and value."""
    recorder = Recorder()
    with pytest.raises(ValueError, match=r"`schedule` at step 3 is -0\.125; a weight decay must be a finite float"):
        fit(tmp_path, Net(), WeightDecayScheduler(lambda step: 0.25 - step / 8), recorder, max_steps=5)
    assert recorder.decays("decay") == [0.25, 0.125, 0.0]


@pytest.mark.parametrize(
    ("interval", "trainer", "message"),
    [
        ("step", {"max_steps": -1, "max_epochs": -1}, r"pass `total_steps=` \(optimizer steps\), or give the Trainer"),
        ("epoch", {"max_steps": 3, "max_epochs": -1}, r"pass `total_steps=` \(epochs\), or give the Trainer `max_ep"),
    ],
)
def test_schedule_without_a_length_refused_before_training(tmp_path, interval, trainer, message):
    """Test that a schedule whose length neither `total_steps` nor the Trainer gives is refused at fit start."""
    model = Net()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"`WeightDecayScheduler\('cosine'\)` needs the schedule's length: " + message):
        fit(tmp_path, model, WeightDecayScheduler("cosine", end=END, interval=interval), **trainer)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_raw_loop_without_a_length_or_optimizers_refused():
    """Test the plain object: no length is refused when it takes the optimizer, no optimizer when it steps."""
    optimizer = torch.optim.AdamW(param_groups(tanh_mlp()), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"needs the schedule's length: pass `total_steps=`"):
        WeightDecayScheduler("cosine", end=END, optimizers=[optimizer])
    with pytest.raises(ValueError, match=r"has no optimizers to schedule: pass `optimizers=\[optimizer\]`"):
        WeightDecayScheduler("constant", start=0.1).step()


# -- the example ---------------------------------------------------------------------------------------------------


def test_dino_schedule_example_quick(tmp_path):
    """Test `examples/dino_schedule.py --quick`: it trains, reports the schedule's ends and the accuracy, and writes
    the PNG of the norms and the schedule from its CSV."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "dino_schedule.py"), "--quick", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    png = tmp_path / "out" / "dino_schedule.png"
    assert f"wrote {png}" in result.stdout
    assert "validation accuracy" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = tmp_path / "out" / "version_0" / "metrics.csv"
    decays = [v for _, v in read_csv(metrics, "weight_decay/decay")]
    assert decays[0] == 0.0  # the warm-up starts from 0
    assert max(decays) <= 0.4
    assert all(v == 0.0 for _, v in read_csv(metrics, "weight_decay/no_decay"))
    assert math.isfinite(read_csv(metrics, "weight_2.0_norm/decay")[-1][1])
