"""Decay toward a reference (L2-SP, ``weight_decay_toward``): the step against oracles written out by hand, the
references (copies, dtype, device, checkpoints, bit-identical resume), the mixin, fine-tuning, the monitor, CLI and
bad input."""

from __future__ import annotations

import copy
import csv
import functools
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytorch_lightning as pl
import torch
from fits import fit_with_checkpoints, run_cli, trainer_kwargs
from models import TanhNet
from oracles import OPTIMIZERS, assert_close, train
from pytorch_lightning.callbacks import BackboneFinetuning
from pytorch_lightning.loggers import CSVLogger
from test_silent_cases import LionLike
from torch import nn
from torch.utils.data import DataLoader

from lightning_nodecay import (
    GroupRules,
    NoDecayBackboneFinetuning,
    NoDecayMixin,
    WeightDecayHook,
    WeightNormMonitor,
    attach_weight_decay_hook,
    decide,
    param_groups,
)

WD = 0.3
STYLES = {"SGD-momentum": "coupled", "Adam": "coupled", "AdamW": "decoupled", "RMSprop": "coupled"}


class TowardByHand:
    """Reference optimizers: the penalty toward ``p0`` written out per parameter with plain tensor ops, then the
    optimizer's own update with its ``weight_decay`` at 0. Coupled: ``grad += wd * m * (p - p0)`` (L2) or
    ``wd * m * sign(p - p0)`` (L1); decoupled: ``p -= v * m * (p - p0)`` (L2) or the proximal step
    ``p = p0 + sign(p - p0) * max(|p - p0| - v * m, 0)`` (L1), with ``v = lr * wd`` (``lr / lr0 * wd`` when
    independent). Each group's ``wd`` is its ``toward_wd``."""

    def __init__(self, params: Any, by_hand: dict, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        self.by_hand = {"lr0": kwargs["lr"], "masks": {}, "l1": set(), **by_hand}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        assert closure is None
        spec = self.by_hand
        for group in self.param_groups:  # type: ignore[attr-defined]
            wd = group["toward_wd"]
            for p in group["params"]:
                if p.grad is None or not wd:
                    continue
                offset, mask, l1 = p - spec["references"][p], spec["masks"].get(p, 1.0), p in spec["l1"]
                if spec["style"] == "coupled":
                    p.grad.add_(wd * mask * (offset.sign() if l1 else offset))
                    continue
                value = group["lr"] * wd / (spec["lr0"] if spec["style"] == "independent" else 1.0)
                if l1:
                    p.copy_(spec["references"][p] + offset.sign() * (offset.abs() - value * mask).clamp(min=0))
                else:
                    p.sub_(value * mask * offset)
        return super().step()  # type: ignore[misc]


def oracle_optimizer(optimizer_class: type, params: Any, by_hand: dict, **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_class`` with :class:`TowardByHand`'s penalty, its own ``weight_decay`` at 0."""
    cls = type(f"{optimizer_class.__name__}TowardByHand", (TowardByHand, optimizer_class), {})
    return cls(params, by_hand, weight_decay=0.0, **kwargs)


def lion(params: Any, **kwargs: Any) -> LionLike:
    return LionLike(params, lr=0.01, **kwargs)


#: name: (factory taking params and weight_decay, optimizer class, style)
ALL_STYLES = {
    **{name: (OPTIMIZERS[name], OPTIMIZERS[name].func, style) for name, style in STYLES.items()},
    "Lion": (lion, LionLike, "independent"),
}


@pytest.mark.parametrize("penalty", ["l2", "l1"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(ALL_STYLES))
def test_step_toward_initial_matches_oracle(name, masked, penalty):
    """Test that 12 steps toward the initial weights equal the penalty written out by hand, for coupled (SGD, Adam,
    RMSprop), decoupled (AdamW) and independent (Lion-like) optimizers under an LR schedule, L2 and L1 (on `v`),
    with and without a mask (on `w`), and that the references never move."""
    build, optimizer_class, style = ALL_STYLES[name]
    net, reference = TanhNet(), TanhNet()
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    mask = torch.tensor([[1.0], [0.0], [2.0], [0.5]], dtype=torch.float64)
    l1 = ("v",) if penalty == "l1" else ()
    rules = GroupRules(no_decay_param_names=(), weight_decay_toward="initial", weight_decay_l1=l1)
    optimizer = build(param_groups(net, rules), weight_decay=WD)
    hook = attach_weight_decay_hook(
        optimizer, {"w": mask} if masked else None, module=net, decisions=decide(net, rules)
    )
    assert len(hook.hooked_groups) == len(optimizer.param_groups)
    params = dict(reference.named_parameters())
    spec = {
        "references": {p: initial[n] for n, p in params.items()},
        "style": style,
        "masks": {params["w"]: mask} if masked else {},
        "l1": {params["v"]} if l1 else set(),
    }
    kwargs = {"lr": 0.01} if name == "Lion" else dict(OPTIMIZERS[name].keywords)
    oracle = oracle_optimizer(optimizer_class, [{"params": list(params.values()), "toward_wd": WD}], spec, **kwargs)

    def run(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        train(model, opt, steps=12, scheduler=torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5))

    run(net, optimizer)
    run(reference, oracle)
    assert_close(net.w, reference.w)
    assert_close(net.v, reference.v)
    for n, p in net.named_parameters():
        assert torch.equal(hook.references[p], initial[n])
    assert not torch.allclose(net.w, initial["w"])


def test_explicit_zero_reference_equals_plain_decay_and_given_references_are_used(tmp_path):
    """Test that a reference state dict of zeros trains exactly like plain weight decay (a cross-check of the two
    paths), that given references are copied (not aliased) into the parameter's dtype, and that a file works too."""
    plain, toward_zeros = TanhNet(), TanhNet()
    zeros = {"w": torch.zeros(4, 6, dtype=torch.float32), "v": torch.zeros(3, 4, dtype=torch.float32)}
    rules = GroupRules(no_decay_param_names=(), weight_decay_toward=zeros)
    optimizer = torch.optim.AdamW(param_groups(toward_zeros, rules), lr=0.01, weight_decay=WD)
    hook = attach_weight_decay_hook(optimizer, module=toward_zeros, decisions=decide(toward_zeros, rules))
    train(toward_zeros, optimizer, steps=10)
    train(plain, torch.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=WD), steps=10)
    assert_close(toward_zeros.w, plain.w)
    assert_close(toward_zeros.v, plain.v)
    assert all(r.dtype == torch.float64 and not r.any() for r in hook.references.values())
    assert all(r.data_ptr() != z.data_ptr() for r, z in zip(hook.references.values(), zeros.values(), strict=False))

    pretrained = TanhNet(seed=5)
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": pretrained.state_dict(), "epoch": 3}, path)  # a Lightning checkpoint's layout
    net = TanhNet()
    from_file = GroupRules(weight_decay_toward=str(path))
    assert [g["name"] for g in param_groups(net, from_file)] == ["decay_to_init"]
    optimizer = torch.optim.SGD(param_groups(net, from_file), lr=0.1, weight_decay=WD)
    hook = attach_weight_decay_hook(optimizer, module=net, decisions=decide(net, from_file))
    assert torch.equal(hook.references[net.w], pretrained.w)
    assert torch.equal(hook.references[net.v], pretrained.v)


def test_references_follow_the_parameters_dtype_and_keep_their_values():
    """Test that `model.to(dtype)` after attaching moves the references to the new dtype at the next step, with
    the values they had, and the step still matches the oracle."""
    net = TanhNet().float()
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    rules = GroupRules(weight_decay_toward="initial")
    optimizer = torch.optim.SGD(param_groups(net, rules), lr=0.1, weight_decay=WD)
    hook = attach_weight_decay_hook(optimizer, module=net, decisions=decide(net, rules))
    net.double()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before = net.w.detach().clone()
    with torch.no_grad():
        net.w.add_(1.0)
    optimizer.step()
    assert hook.references[net.w].dtype == torch.float64
    assert torch.equal(hook.references[net.w], initial["w"].double())
    assert_close(net.w, before + 1.0 - 0.1 * WD * 1.0)  # SGD: p -= lr * wd * (p - p0), p - p0 = 1


class L2SPNet(NoDecayMixin, pl.LightningModule):
    """A `backbone` (Linear + LayerNorm) decayed toward its initial weights, a `head` toward zero at half strength."""

    weight_decay_toward: ClassVar = {"backbone.**": "initial"}
    weight_decay_multipliers: ClassVar = {"head.**": 0.5}

    def __init__(self, optimizer: Any = None, batches: int = 2) -> None:
        super().__init__()
        self.batches = batches  # per epoch
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.backbone(x)))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self(batch) - 1.0).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(self.batches * 4, 4, generator=torch.Generator().manual_seed(1)), batch_size=4)


FIT = {
    "SGD": (functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.5), "coupled"),
    "AdamW": (functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5), "decoupled"),
}


@pytest.mark.parametrize("name", list(FIT))
def test_mixin_fit_matches_a_hand_written_loop(tmp_path, name):
    """Test that a Trainer fit of the mixin (backbone toward its initial weights, head toward zero at x0.5, biases
    and the norm excluded) equals a plain loop with the penalties written out by hand, step for step."""
    build, style = FIT[name]
    model = L2SPNet(build)
    twin = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6)).fit(model)
    assert [g["name"] for g in model.trainer.optimizers[0].param_groups] == ["no_decay", "decay_x0.5", "decay_to_init"]

    params = dict(twin.named_parameters())
    references = {p: initial[n] if n.startswith("backbone") else torch.zeros_like(p) for n, p in params.items()}
    groups = [
        {"params": [params["backbone.0.weight"]], "toward_wd": 0.5},
        {"params": [params["head.weight"]], "toward_wd": 0.25},
        {"params": [params[n] for n in ("backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "head.bias")]},
    ]
    groups[2]["toward_wd"] = 0.0
    keywords = {k: v for k, v in build.keywords.items() if k != "weight_decay"}
    oracle = oracle_optimizer(build.func, groups, {"references": references, "style": style}, **keywords)
    batches = [b for _ in range(3) for b in twin.train_dataloader()]
    for batch in batches:
        oracle.zero_grad()
        twin.training_step(batch, 0).backward()
        oracle.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, params[n], rtol=1e-5, atol=1e-6, msg=n)
    hook = WeightDecayHook.of(model.trainer.optimizers[0])
    assert torch.equal(hook.references[model.backbone[0].weight], initial["backbone.0.weight"])
    assert set(hook.references) == {model.backbone[0].weight}  # one copy, of exactly what needs one


def test_resume_is_bit_identical_and_keeps_the_references(tmp_path):
    """Test that 4 steps straight and a resume from its step-2 checkpoint give bit-identical weights, and that the
    resumed run decays toward the references in the checkpoint, not toward the weights it resumes from."""
    straight = L2SPNet(batches=1)  # Lightning replays a 2-batch epoch differently when resuming at its end
    initial = straight.backbone[0].weight.detach().clone()
    fit_with_checkpoints(tmp_path / "straight", straight, max_steps=4)
    checkpoint = tmp_path / "straight" / "epoch=1-step=2.ckpt"
    assert torch.equal(
        torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["weight_decay_references"][5], initial
    )
    resumed = L2SPNet(batches=1)
    trainer = fit_with_checkpoints(tmp_path / "resumed", resumed, max_steps=4, ckpt_path=checkpoint)
    for (n, p), q in zip(resumed.named_parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q), n
    hook = WeightDecayHook.of(trainer.optimizers[0])
    assert torch.equal(hook.references[resumed.backbone[0].weight], initial)


def test_checkpoint_without_references_warns_and_names_the_parameter(tmp_path, caplog):
    """Test that resuming an L2-SP run from a checkpoint saved without references says which parameter keeps the
    reference taken at this fit's start."""

    class Plain(L2SPNet):
        weight_decay_toward = "zero"

    fit_with_checkpoints(tmp_path / "plain", Plain(), max_steps=2)
    with caplog.at_level("WARNING", logger="lightning_nodecay"):
        fit_with_checkpoints(
            tmp_path / "sp", L2SPNet(), max_steps=4, ckpt_path=tmp_path / "plain" / "epoch=0-step=2.ckpt"
        )
    assert "The checkpoint holds no weight-decay reference for `backbone.0.weight`" in caplog.text


def test_monitor_logs_the_distance_to_the_reference(tmp_path):
    """Test that `WeightNormMonitor` writes `distance_to_reference/decay_to_init` to a real CSV file, equal to the
    norm of the final backbone weight minus its initial value computed by hand, and nothing for other groups."""
    model = L2SPNet()
    initial = model.backbone[0].weight.detach().clone()
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=3))
    trainer.callbacks.append(WeightNormMonitor())
    trainer.fit(model)
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("distance_to_reference/decay_to_init")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    expected = torch.linalg.vector_norm(model.backbone[0].weight.detach() - initial).item()
    assert float(rows[-1]["distance_to_reference/decay_to_init"]) == pytest.approx(expected, rel=1e-5)
    assert not any(key.startswith("distance_to_reference/") and "to_init" not in key for key in rows[0])


class FrozenBackboneNet(L2SPNet):
    """`L2SPNet` whose backbone the fine-tuning callback unfreezes; every decayed parameter toward its start."""

    weight_decay_toward = "initial"
    weight_decay_multipliers: ClassVar = {}

    def configure_optimizers(self) -> Any:
        self.backbone.requires_grad_(False)
        return super().configure_optimizers()


def test_unfrozen_backbone_decays_toward_its_weights_when_unfrozen(tmp_path):
    """Test that `NoDecayBackboneFinetuning` unfreezes the backbone into a reference group whose references are the
    backbone's weights when unfrozen, taken over by the step hook, and that the backbone then moves."""
    model = FrozenBackboneNet()
    backbone = model.backbone[0].weight.detach().clone()
    callback = NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, max_steps=-1), callbacks=[callback])
    trainer.fit(model)
    optimizer = trainer.optimizers[0]
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["no_decay", "decay_to_init", "backbone_no_decay", "backbone_decay_to_init"]
    hook = WeightDecayHook.of(optimizer)
    assert hook.hooked_groups == [1, 3]
    assert torch.equal(hook.references[model.backbone[0].weight], backbone)
    assert not torch.equal(model.backbone[0].weight, backbone)


class NoBiasBackbone(L2SPNet):
    weight_decay_toward = "initial"

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4, bias=False)).requires_grad_(False)


def test_lightning_finetuning_into_a_plain_group_is_refused_before_the_step(tmp_path):
    """Test that Lightning's own `BackboneFinetuning`, which puts unfrozen parameters to decay toward their reference
    into one plain group, is refused before the first step that would pull them toward zero."""
    callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, max_steps=-1), callbacks=[callback])
    with pytest.raises(
        ValueError, match=r"decay toward their reference \(`backbone\.0\.weight`\).*so they would decay"
    ):
        trainer.fit(NoBiasBackbone())


def test_cli_yaml_declares_decay_toward_the_initial_weights(tmp_path):
    """Test that LightningCLI YAML sets per-rule targets, and they reach the groups and the hook."""
    from test_cli import RulesModel

    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  optimizer:\n"
        "    class_path: torch.optim.AdamW\n"
        "    init_args: {lr: 0.01, weight_decay: 0.2}\n"
        "  group_rules:\n"
        "    weight_decay_toward: {'head.*': initial}\n"
    )
    cli = run_cli(RulesModel, tmp_path, f"--config={config}")
    optimizer = cli.trainer.optimizers[0]
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "decay_to_init"]
    assert list(WeightDecayHook.of(optimizer).references) == [cli.model.head.weight]


@pytest.mark.parametrize(
    ("toward", "error", "match"),
    [
        ("somewhere.pt", ValueError, r"`weight_decay_toward` is 'somewhere.pt': neither 'zero', 'initial' nor an"),
        ({"w": "pretrained"}, ValueError, r"`weight_decay_toward\['w'\]` is 'pretrained'; a rule's target is"),
        (3, TypeError, r"`weight_decay_toward` must be 'zero', 'initial', a non-empty dict"),
        ({}, TypeError, r"`weight_decay_toward` must be"),
        ({"w*": "initial", "a..b": "zero"}, ValueError, r"weight_decay_toward"),
    ],
)
def test_bad_targets_are_refused_when_the_rules_are_built(toward, error, match):
    """Test that a bad `weight_decay_toward` is refused by `GroupRules`, naming the argument and the fix."""
    with pytest.raises(error, match=match):
        GroupRules(weight_decay_toward=toward)


def test_bad_references_are_refused_naming_the_parameter():
    """Test the errors of references: another shape, a state dict naming no parameter (with the closest name), two
    rules with different targets, a pattern matching nothing, and a reference for a parameter of a plain group."""
    net = TanhNet()
    with pytest.raises(ValueError, match=r"reference of `w` has shape \(6, 4\), the parameter \(4, 6\)"):
        decide(net, GroupRules(weight_decay_toward={"w": torch.zeros(6, 4)}))
    with pytest.raises(ValueError, match=r"names no decayed parameter.*key `model.w` .* strip the prefix `model.`"):
        decide(net, GroupRules(weight_decay_toward={"model.w": torch.zeros(4, 6)}))
    with pytest.raises(ValueError, match=r"`w` matches two `weight_decay_toward` rules with different targets"):
        decide(net, GroupRules(weight_decay_toward={"w": "initial", "*": "zero"}))
    with pytest.raises(ValueError, match=r"`weight_decay_toward` pattern `head.\*` matches no parameter"):
        decide(net, GroupRules(weight_decay_toward={"head.*": "initial"}))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=WD)
    with pytest.raises(ValueError, match=r"`w` has a weight-decay reference but is in no group .* decayed toward a"):
        attach_weight_decay_hook(optimizer, module=net, references={"w": torch.zeros(4, 6)})
    rules = GroupRules(weight_decay_toward="initial")
    with pytest.raises(ValueError, match=r"`w` should get decay toward its reference .* which has no `'weight_decay_"):
        attach_weight_decay_hook(optimizer, module=net, decisions=decide(net, rules))
    with pytest.raises(ValueError, match=r"reference of `w` contains NaN or inf"):
        decide_and_attach(net, {"w": torch.full((4, 6), math.nan, dtype=torch.float64)})


def decide_and_attach(net: nn.Module, state: dict) -> WeightDecayHook:
    rules = GroupRules(weight_decay_toward=state, strict=False)
    optimizer = torch.optim.SGD(param_groups(net, rules), lr=0.1, weight_decay=WD)
    return attach_weight_decay_hook(optimizer, module=net, decisions=decide(net, rules))


def fsdp2_worker(rank: int, port: int) -> None:
    """Under FSDP2 on 2 gloo ranks: references are DTensors sharded like their parameters, three AdamW steps match
    the by-hand oracle on the unsharded model, the distance reduces across ranks, and the state dict round-trips."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_nodecay._schema import REFERENCES_STATE
    from lightning_nodecay.norms import NormPlan, reduce_stats

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        twin = copy.deepcopy(model)
        initial = {n: p.detach().clone() for n, p in twin.named_parameters()}
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        rules = GroupRules(weight_decay_toward="initial")
        optimizer = torch.optim.AdamW(param_groups(model, rules), lr=0.05, weight_decay=WD)
        hook = attach_weight_decay_hook(optimizer, module=model, decisions=decide(model, rules))
        for param, reference in hook.references.items():
            assert reference.placements == param.placements
            assert reference.to_local().shape == param.to_local().shape
        params = dict(twin.named_parameters())
        decayed = [params["0.weight"], params["2.weight"]]
        groups = [
            {"params": decayed, "toward_wd": WD},
            {"params": [p for n, p in params.items() if n not in ("0.weight", "2.weight")], "toward_wd": 0.0},
        ]
        spec = {"references": {p: initial[n] for n, p in params.items()}, "style": "decoupled"}
        oracle = oracle_optimizer(torch.optim.AdamW, groups, spec, lr=0.05)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))  # the same batch on both ranks
        for net, opt in ((model, optimizer), (twin, oracle)):
            for _ in range(3):
                opt.zero_grad()
                net(x).pow(2).mean().backward()
                opt.step()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.full_tensor(), params[name].detach(), rtol=1e-5, atol=1e-6)
        weights, references = zip(*hook.references.items(), strict=True)
        plan = NormPlan([list(weights)])
        (stats,) = reduce_stats([plan.local_distance(2.0, NormPlan([list(references)]))], 2.0, reduce=plan.reduce)
        offsets = [(params[n] - initial[n]).flatten() for n in ("0.weight", "2.weight")]
        expected = torch.linalg.vector_norm(torch.cat(offsets).detach())
        assert stats.norms(2.0).norms.item() == pytest.approx(expected.item(), rel=1e-5)
        saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it: not the live tensors
        assert all(hasattr(r, "placements") for r in saved[REFERENCES_STATE].values())
        for reference in references:
            reference.to_local().zero_()
        optimizer.load_state_dict(saved)
        for param, reference in hook.references.items():
            name = next(n for n, p in model.named_parameters() if p is param)
            torch.testing.assert_close(reference.full_tensor(), initial[name], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_fsdp2_references_are_sharded_and_match_the_oracle():
    """Test with two gloo processes that FSDP2 references are DTensor shards, the step matches the oracle, the
    distance to the reference reduces across ranks, and the references round-trip through the state dict."""
    import torch.multiprocessing as mp
    from fits import free_port

    mp.spawn(fsdp2_worker, args=(free_port(),), nprocs=2, join=True)


def test_ddp_fit_keeps_one_reference_per_rank_and_logs_the_distance(tmp_path):
    """Test a real 2-process DDP fit on CPU: every rank's references are the weights before the fit, the ranks end
    with the same weights, and rank 0 logs the distance of the final weights to their references."""
    script = Path(__file__).parent / "scripts" / "ddp_reference.py"
    subprocess.run(
        [sys.executable, str(script), str(tmp_path)], check=True, capture_output=True, text=True, timeout=240
    )
    initial = torch.load(tmp_path / "initial.pt")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for saved in ranks:
        assert list(saved["references"]) == ["backbone.0.weight"]
        assert torch.equal(saved["references"]["backbone.0.weight"], initial["backbone.0.weight"])
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in initial)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("distance_to_reference/decay_to_init")]
    final = ranks[0]["weights"]["backbone.0.weight"]
    expected = torch.linalg.vector_norm(final - initial["backbone.0.weight"]).item()
    assert float(rows[-1]["distance_to_reference/decay_to_init"]) == pytest.approx(expected, rel=1e-5)


class DecayRecorder(pl.Callback):
    """Each step's effective decay of every group, read right before the optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        groups = optimizer.param_groups
        self.steps.append({g["name"]: g["weight_decay"] + g.get("hook_weight_decay", 0.0) for g in groups})


def test_weight_decay_schedule_drives_the_pull_toward_the_reference(tmp_path):
    """Test that `WeightDecayScheduler` sets the strength of the reference group at every step (base(t) x its
    multiplier, as for the groups toward zero), and the step follows it: a linear schedule from 0.5 to 0."""
    from lightning_nodecay import WeightDecayScheduler

    model, recorder = L2SPNet(), DecayRecorder()
    schedule = WeightDecayScheduler("linear", start=0.5, end=0.0, total_steps=4)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[schedule, recorder]).fit(model)
    bases = [0.5 * (1 - t / 4) for t in range(4)]  # Megatron's linear: start + (end - start) * t / total
    assert [s["decay_to_init"] for s in recorder.steps] == pytest.approx(bases)
    assert [s["decay_x0.5"] for s in recorder.steps] == pytest.approx([0.5 * b for b in bases])
    assert [s["no_decay"] for s in recorder.steps] == [0.0] * 4


class HandBuiltOptimizer(L2SPNet):
    """`L2SPNet` whose `configure_optimizers` ignores the rules: one AdamW group of every parameter."""

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)


def test_optimizer_built_elsewhere_gets_the_reference_group_and_the_hook(tmp_path):
    """Test that an optimizer built without the rules (a hand-written `configure_optimizers`, LightningCLI's
    `--optimizer`) is split by the safety net into a reference group that the step hook takes over at fit start,
    with the weights at fit start as references, and then trains as the mixin's own groups would."""
    model, reference = HandBuiltOptimizer(), L2SPNet(functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5))
    initial = model.backbone[0].weight.detach().clone()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "a", max_steps=4))
    trainer.fit(model)
    pl.Trainer(**trainer_kwargs(tmp_path / "b", max_steps=4)).fit(reference)
    optimizer = trainer.optimizers[0]
    groups = {g["name"]: (g["weight_decay"], g.get("hook_weight_decay")) for g in optimizer.param_groups}
    assert groups["decay_to_init"] == (0.0, 0.5)
    assert groups["decay_x0.5"] == (pytest.approx(0.25), None)
    assert torch.equal(WeightDecayHook.of(optimizer).references[model.backbone[0].weight], initial)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_l1_proximal_step_lands_exactly_on_the_reference(masked):
    """Test that the decoupled (AdamW) L1 step toward a reference puts every weight whose offset is within the threshold
    exactly on its reference (not within rounding of it), and moves the others by exactly the threshold's worth."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 32))
    reference = weight.detach() + 1e-3 * torch.randn(64, 32)  # offsets around 1e-3
    mask = torch.rand(64, 1) + 0.5 if masked else torch.ones(64, 1)
    model = nn.Module()
    model.weight = weight
    rules = GroupRules(weight_decay_toward={"weight": reference}, weight_decay_l1=("weight",))
    optimizer = torch.optim.AdamW(param_groups(model, rules), lr=1.0, weight_decay=1e-3)  # threshold lr * wd * mask
    attach_weight_decay_hook(
        optimizer, {"weight": mask} if masked else None, module=model, decisions=decide(model, rules)
    )
    offset = (weight - reference).detach()
    inside = offset.abs() <= 1e-3 * mask
    assert 0 < int(inside.sum()) < inside.numel()
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    assert torch.equal(weight.detach()[inside], reference[inside])
    shrunk = (offset - (offset.sign() * 1e-3 * mask))[~inside]
    torch.testing.assert_close(
        weight.detach()[~inside] - reference[~inside], shrunk, rtol=0, atol=1e-6
    )  # float32 of ~1
