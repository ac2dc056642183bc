"""The PReLU digits CNN through LightningCLI: optimizer and weight decay from YAML or the command line.

    python examples/cli.py fit --config examples/config.yaml
    python examples/cli.py fit --config examples/config.yaml --model.optimizer.weight_decay=0.1
    # LightningCLI's own --optimizer flag replaces `configure_optimizers` with one decayed group;
    # the mixin's safety net splits it again before the first step:
    python examples/cli.py fit --config examples/config.yaml --optimizer=SGD --optimizer.lr=0.05 \\
        --optimizer.weight_decay=0.01

Add `--quick` for a few steps (tests). After the fit the script prints every optimizer group with its
weight decay, so you can see the value reach only the `decay` group.
"""

from __future__ import annotations

import sys

import torch
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.cli import LightningCLI, LRSchedulerCallable, OptimizerCallable

from lightning_nodecay import NoDecayMixin

QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]


class CLIDigitsNet(NoDecayMixin, DigitsClassifier):
    """The digits CNN with its optimizer and scheduler injected by LightningCLI."""

    def __init__(
        self, optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler


def main() -> None:
    args = sys.argv[1:]
    if "--quick" in args:
        args = [a for a in args if a != "--quick"] + QUICK
    cli = LightningCLI(CLIDigitsNet, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})
    for optimizer in cli.trainer.optimizers:
        for group in optimizer.param_groups:
            print(
                f"{type(optimizer).__name__} group {group.get('name')!r}: {len(group['params'])} tensors,"
                f" weight_decay={group['weight_decay']}, lr={group['lr']:.4g}"
            )
    print(f"validation accuracy: {cli.trainer.callback_metrics['val_acc']:.3f}")


if __name__ == "__main__":
    main()
