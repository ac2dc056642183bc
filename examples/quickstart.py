"""Quickstart: weight decay on conv/linear weights only, in a real fit on CPU (well under a minute).

A small CNN with BatchNorm and PReLU learns scikit-learn's handwritten digits (8x8 images, bundled,
no download). `NoDecayMixin` builds the param groups; the summary it logs at fit start says what
went where and why.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule

from lightning_nodecay import NoDecayMixin


class DigitsNet(NoDecayMixin, DigitsClassifier):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.05) -> None:
        super().__init__()
        # the optimizer's weight_decay applies to the `decay` group only
        self.optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    model = DigitsNet()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1 if args.quick else args.epochs,
        limit_train_batches=3 if args.quick else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule())
    groups = trainer.optimizers[0].param_groups
    print("optimizer groups:", [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups])
    print(f"validation accuracy: {trainer.callback_metrics['val_acc']:.3f}")


if __name__ == "__main__":
    main()
