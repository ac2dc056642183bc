"""L2-SP on real data: few-shot fine-tuning with the pretrained backbone decayed toward its pretrained weights.

L2-SP (Li, Grandvalet & Davoine, ICML 2018) regularizes fine-tuning with alpha/2 ||w_S - w_S^0||^2 on the pretrained
part (the backbone, pulled toward its pretrained weights w_S^0 instead of toward zero) plus beta/2 ||w_new||^2 on
the new head. With `NoDecayMixin` this is two declarations:

    weight_decay_toward = {"backbone.**": "initial"}     # the backbone toward its weights at fit start
    weight_decay_multipliers = {"head.**": beta / alpha}  # the new head toward zero, at strength beta

and `weight_decay=alpha` on the optimizer; biases and LayerNorm parameters stay excluded by the default rules.

The experiment, on scikit-learn's 1,797 handwritten 8x8 digits (no download):

1. Pretrain an MLP (`backbone`: two Linear(128) + LayerNorm + ReLU blocks; `head`: Linear(5)) on digits 0-4 (a
   Lightning fit, AdamW).
2. Fine-tune on digits 5-9 with k = 5, 10 or 20 labelled images per class and a NEW 5-class head, every weight
   trainable. The digits 5-9 are split once (fixed seed) into a test split (80 per class), a validation split
   (30 per class) and a pool (the rest, 64 to 73 per class); a fine-tuning seed draws the k images per class from
   the pool and initializes the head.
3. Three methods, same optimizer, learning rate and steps:
   (a) `no decay`: `weight_decay=0`;
   (b) `L2`: plain weight decay alpha toward zero on the default `decay` group (every Linear weight), the
       paper's L2 baseline;
   (c) `L2-SP`: the backbone's weights toward their pretrained values at alpha, the head's weight toward zero at
       beta.

Optimizer: SGD with momentum 0.9, as in the paper. SGD's weight decay is *coupled* (added to the gradient), so the
library's hook adds alpha (w - w0) to the gradient: exactly the gradient of the paper's penalty, with no
interaction with an adaptive step size (AdamW would apply the decoupled variant, a different regularizer).

Hyperparameters. Fixed a priori: lr 0.01, momentum 0.9, 150 full-batch steps (enough for every method to fit the
few-shot set), beta = 0.01 (the paper's value). Selected on the VALIDATION split, never on the test split: alpha
for `L2` and for `L2-SP`, separately for each k, from {0.001, 0.01, 0.1, 1}, by the mean validation accuracy over
3 selection seeds (seeds 100-102, distinct from the evaluation seeds 0..n-1, so the selection never sees an
evaluation draw). Then each method is fine-tuned with its alpha on n seeds and evaluated on the test split.
(A validation split of 30 images per class is larger than the few-shot training set: a luxury a real few-shot
task rarely has; it is only used to give `L2` and `L2-SP` each their best alpha.)

The evaluation runs log with `WeightNormMonitor`, which logs `distance_to_reference/decay_to_init` = ||w - w0||
for the L2-SP group; the script prints it next to the same distance computed for the other methods, then a table
of test accuracy (mean +- std over seeds) per method and k, and writes a PNG of accuracy and distance vs k.

    python examples/l2sp_digits.py                 # 10 seeds, about 3 minutes on 2 CPU cores
    python examples/l2sp_digits.py --quick         # 1 seed, k=5, a few steps (tests)
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import math
import statistics
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics
from digits import DigitsDataModule, DigitsTask
from pytorch_lightning.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nodecay import NoDecayMixin, WeightNormMonitor

METHODS = ("no decay", "L2", "L2-SP")
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
TEST_PER_CLASS, VAL_PER_CLASS = 80, 30
ALPHAS = (0.001, 0.01, 0.1, 1.0)
SELECTION_SEEDS = (100, 101, 102)
DISTANCE_KEY = "distance_to_reference/decay_to_init"


def backbone(width: int = 128) -> nn.Sequential:
    """8x8 image -> ``width`` features: two Linear / LayerNorm / ReLU blocks."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.LayerNorm(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.ReLU(),
    )


class Pretrain(DigitsTask):
    """The source task: digits 0-4, plain AdamW (the pretraining recipe does not matter here)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=len(SOURCE))
        self.backbone, self.head, self.lr = backbone(), nn.Linear(128, len(SOURCE)), lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class FineTune(NoDecayMixin, DigitsTask):
    """The target task: the pretrained backbone, a new 5-class head, decay as `method` says."""

    def __init__(self, pretrained: dict[str, torch.Tensor], method: str, alpha: float, beta: float, lr: float) -> None:
        super().__init__()
        self.backbone, self.head = backbone(), nn.Linear(128, len(TARGET))
        self.backbone.load_state_dict(pretrained)
        weight_decay = 0.0 if method == "no decay" else alpha
        if method == "L2-SP":
            self.weight_decay_toward = {"backbone.**": "initial"}  # the head: toward zero
            self.weight_decay_multipliers = {"head.**": beta / alpha}
        self.optimizer = functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=weight_decay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def backbone_weights(self) -> list[torch.Tensor]:
        """The backbone's decayed parameters (its Linear weights): the `decay_to_init` group of L2-SP."""
        return [m.weight.detach().clone() for m in self.backbone.modules() if isinstance(m, nn.Linear)]


def pretrain(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], float]:
    """Pretrain on digits 0-4; the backbone's state dict and the source validation accuracy."""
    pl.seed_everything(0, verbose=False)
    model = Pretrain()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2 if args.quick else args.pretrain_epochs,
        limit_train_batches=5 if args.quick else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(classes=SOURCE))
    accuracy = trainer.validate(model, DigitsDataModule(classes=SOURCE), verbose=False)[0]["val_acc"]
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}, accuracy


def target_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits 5-9 (labels 0-4), split once: ``test``, ``val`` and the few-shot ``pool``, per class."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(1234)
    parts: dict[str, list[torch.Tensor]] = {"test": [], "val": [], "pool": []}
    for digit in TARGET:
        index = torch.nonzero(y == digit).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        parts["test"].append(index[:TEST_PER_CLASS])
        parts["val"].append(index[TEST_PER_CLASS : TEST_PER_CLASS + VAL_PER_CLASS])
        parts["pool"].append(index[TEST_PER_CLASS + VAL_PER_CLASS :])
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[list(TARGET)] = torch.arange(len(TARGET))
    return {name: (x[torch.cat(i)], relabel[y[torch.cat(i)]]) for name, i in parts.items()}


def few_shot(pool: tuple[torch.Tensor, torch.Tensor], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` images per class drawn from the pool by ``seed``."""
    x, y = pool
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(TARGET)):
        index = torch.nonzero(y == label).flatten()
        chosen.append(index[torch.randperm(len(index), generator=generator)[:k]])
    index = torch.cat(chosen)
    return x[index], y[index]


def fine_tune(
    pretrained: dict[str, torch.Tensor],
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    method: str,
    k: int,
    seed: int,
    alpha: float,
    args: argparse.Namespace,
    log_dir: Path | None = None,
) -> FineTune:
    """Fine-tune one method on ``k`` images per class drawn by ``seed`` (which also initializes the head)."""
    x, y = few_shot(splits["pool"], k, seed)
    steps = 10 if args.quick else args.steps
    batches = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=len(x))  # full batch
    pl.seed_everything(seed, verbose=False)
    model = FineTune(pretrained, method, alpha, args.beta, args.lr)
    model.log_weight_decay_summary = False
    logger = CSVLogger(log_dir.parent, name="", version=log_dir.name) if log_dir is not None else False
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=[WeightNormMonitor()] if log_dir is not None else None,
        log_every_n_steps=1 if args.quick else 10,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=batches)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = split
    return (model(x).argmax(1) == y).float().mean().item()


def distance(model: FineTune, pretrained: dict[str, torch.Tensor]) -> float:
    """||w - w0|| over the backbone's Linear weights (the parameters L2-SP pulls toward w0), computed directly."""
    start = [v for name, v in pretrained.items() if name.endswith("weight") and v.dim() == 2]
    return math.sqrt(sum((w - w0).pow(2).sum().item() for w, w0 in zip(model.backbone_weights(), start, strict=True)))


def logged_distance(metrics_csv: Path) -> float:
    """The last ``distance_to_reference/decay_to_init`` the monitor logged."""
    with open(metrics_csv) as file:
        return [float(row[DISTANCE_KEY]) for row in csv.DictReader(file) if row.get(DISTANCE_KEY)][-1]


def select_alpha(pretrained, splits, method: str, k: int, args: argparse.Namespace) -> tuple[float, dict]:
    """The alpha of ``ALPHAS`` with the best mean VALIDATION accuracy over the selection seeds.

    Also returns ``{alpha: (mean validation accuracy, mean backbone distance ||w - w0||)}``.
    """
    if method == "no decay":
        return 0.0, {}
    if args.quick:
        return 0.01, {}
    scores = {}
    for alpha in ALPHAS:
        models = [fine_tune(pretrained, splits, method, k, seed, alpha, args) for seed in SELECTION_SEEDS]
        scores[alpha] = (
            statistics.mean(accuracy(model, splits["val"]) for model in models),
            statistics.mean(distance(model, pretrained) for model in models),
        )
    return max(scores, key=lambda alpha: scores[alpha][0]), scores  # ties: the first (smallest) alpha


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def plot(results: dict, selection: dict, ks: list[int], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, dist_ax, alpha_ax) = plt.subplots(1, 3, figsize=(16, 4.2), dpi=90)
    for shift, method in zip((-0.3, 0.0, 0.3), METHODS, strict=True):
        for ax, key in ((acc_ax, "acc"), (dist_ax, "dist")):
            runs = [results[method, k][key] for k in ks]
            means = [statistics.mean(r) for r in runs]
            stds = [statistics.stdev(r) if len(r) > 1 else 0.0 for r in runs]
            ax.errorbar([k + shift for k in ks], means, yerr=stds, marker="o", capsize=4, label=method)
    seeds = len(results[METHODS[0], ks[0]]["acc"])
    acc_ax.set(xlabel="labelled images per class (k)", ylabel="test accuracy", xticks=ks)
    acc_ax.set_title(f"Digits 5-9 after pretraining on 0-4 (mean ± std, {seeds} seeds)")
    dist_ax.set(xlabel="labelled images per class (k)", ylabel="||w - w0|| (backbone weights)", xticks=ks)
    dist_ax.set_title("How far fine-tuning moved the backbone (selected alpha)")
    for (method, k), scores in selection.items():  # empty in quick mode
        color = {"L2": "tab:orange", "L2-SP": "tab:green"}[method]
        style = {5: ":", 10: "--", 20: "-"}.get(k, "-.")
        distances = [d for _, d in scores.values()]
        alpha_ax.plot(list(scores), distances, style, marker="o", color=color, label=f"{method}, k={k}")
    alpha_ax.set(xscale="log", yscale="log", xlabel="alpha", ylabel="||w - w0|| (backbone weights)")
    alpha_ax.set_title("Distance vs alpha (selection runs, mean of 3 seeds)")
    if not selection:
        alpha_ax.text(0.5, 0.5, "no alpha selection in --quick mode", ha="center", transform=alpha_ax.transAxes)
    for ax in (acc_ax, dist_ax, alpha_ax) if selection else (acc_ax, dist_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="evaluation seeds per method and k")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20], help="labelled images per class")
    parser.add_argument("--steps", type=int, default=150, help="full-batch fine-tuning steps")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--beta", type=float, default=0.01, help="L2-SP's decay of the new head, toward zero")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/l2sp_digits"))
    parser.add_argument("--quick", action="store_true", help="1 seed, k=5, a few steps (tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny MLP: one thread is faster than two
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # ~200 fits: no per-fit banners
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    ks, seeds = ([5], 1) if args.quick else (args.ks, args.seeds)

    pretrained, source_accuracy = pretrain(args)
    w0 = math.sqrt(sum(v.pow(2).sum().item() for v in pretrained.values() if v.dim() == 2))
    print(f"pretrained on digits 0-4: validation accuracy {source_accuracy:.3f}; backbone weights ||w0|| = {w0:.2f}")
    splits = target_splits()
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    print(f"digits 5-9: {sizes} images; fine-tuning: SGD(momentum=0.9), lr {args.lr}, beta {args.beta}")

    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    chosen: dict[tuple[str, int], float] = {}
    selection: dict[tuple[str, int], dict[float, tuple[float, float]]] = {}
    for k in ks:
        for method in METHODS:
            alpha, scores = select_alpha(pretrained, splits, method, k, args)
            chosen[method, k] = alpha
            if scores:
                listed = ", ".join(f"{a:g}: {acc:.3f} ({dist:.2f})" for a, (acc, dist) in scores.items())
                print(f"k={k} {method}: validation accuracy (backbone ||w - w0||) by alpha {{{listed}}} -> {alpha:g}")
                selection[method, k] = scores
            runs: dict[str, list[float]] = {"acc": [], "dist": [], "logged": []}
            for seed in range(seeds):
                log_dir = args.out / method.replace(" ", "_") / f"k{k}_seed{seed}"
                model = fine_tune(pretrained, splits, method, k, seed, alpha, args, log_dir)
                runs["acc"].append(accuracy(model, splits["test"]))
                runs["dist"].append(distance(model, pretrained))
                if method == "L2-SP":
                    runs["logged"].append(logged_distance(log_dir / "metrics.csv"))
            results[method, k] = runs

    print(f"\nTest accuracy on digits 5-9 ({len(splits['test'][1])} test images), mean ± std over seeds:")
    header = ("method", *(f"k={k}" for k in ks), "seeds")
    print(table(header, [(m, *(mean_std(results[m, k]["acc"]) for k in ks), str(seeds)) for m in METHODS]))
    print("\nalpha selected on the validation split (beta fixed):")
    print(table(("method", *(f"k={k}" for k in ks)), [(m, *(f"{chosen[m, k]:g}" for k in ks)) for m in METHODS]))
    print("\nBackbone distance to the pretrained weights ||w - w0|| after fine-tuning, mean ± std over seeds:")
    distances = [(m, *(mean_std(results[m, k]["dist"]) for k in ks)) for m in METHODS]
    print(table(("method", *(f"k={k}" for k in ks)), distances))
    for k in ks:
        logged = results["L2-SP", k]["logged"]
        direct = mean_std(results["L2-SP", k]["dist"])
        print(f"L2-SP k={k}: WeightNormMonitor's last {DISTANCE_KEY} = {mean_std(logged)} (computed: {direct})")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "l2sp_digits.png"
    plot(results, selection, ks, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
