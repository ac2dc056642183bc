"""Fine-tuning: a pretrained backbone frozen, then unfrozen, keeping the weight-decay split.

1. "Pretrain" the PReLU CNN on the digits 0-4 (a stand-in for a downloaded backbone).
2. Fine-tune on all ten digits with a fresh head: the backbone frozen for the first epochs, then
   unfrozen by `NoDecayBackboneFinetuning`, a drop-in for Lightning's `BackboneFinetuning`. The
   unfrozen backbone joins the optimizer as `backbone_decay` (conv weights, decayed) and
   `backbone_no_decay` (biases, BatchNorm, PReLU slopes, weight_decay=0.0).
3. For contrast, the same run with Lightning's own `BackboneFinetuning`, which adds ONE group with
   the optimizer's weight decay, biases and norms included: the mixin refuses it at the unfreeze
   epoch, before those parameters take a step, and says what to use instead.

    python examples/finetune.py            # about a minute on 2 CPU cores
    python examples/finetune.py --quick    # a few steps (tests)
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.callbacks import BackboneFinetuning

from lightning_nodecay import NoDecayBackboneFinetuning, NoDecayMixin

WEIGHT_DECAY = 0.05


class FinetuneNet(NoDecayMixin, DigitsClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.optimizer = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=WEIGHT_DECAY)


class PrintGroups(pl.Callback):
    """Print every optimizer group at the start of each epoch (after the unfreeze of that epoch)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = [(g.get("name"), len(g["params"]), g["weight_decay"]) for g in trainer.optimizers[0].param_groups]
        print(f"epoch {trainer.current_epoch}: {groups}")


def trainer(args: argparse.Namespace, epochs: int, *callbacks: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=2 if args.quick else None,
        limit_val_batches=1 if args.quick else None,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def pretrained_backbone(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = FinetuneNet()
    model.log_weight_decay_summary = False
    trainer(args, 1 if args.quick else 2).fit(model, DigitsDataModule(classes=(0, 1, 2, 3, 4)))
    return model.backbone.state_dict()


def finetune(args: argparse.Namespace, backbone: dict[str, torch.Tensor], callback: pl.Callback) -> FinetuneNet:
    pl.seed_everything(1, verbose=False)
    model = FinetuneNet()
    model.backbone.load_state_dict(backbone)
    trainer(args, 3 if args.quick else 4, callback, PrintGroups()).fit(model, DigitsDataModule())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    args = parser.parse_args()
    backbone = pretrained_backbone(args)
    unfreeze_at = 1 if args.quick else 2

    print("== NoDecayBackboneFinetuning")
    model = finetune(args, backbone, NoDecayBackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at))
    print(f"validation accuracy: {model.trainer.callback_metrics['val_acc']:.3f}")

    print("== Lightning's BackboneFinetuning")
    try:
        finetune(args, backbone, BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at))
    except ValueError as error:
        print(f"refused: {error}")


if __name__ == "__main__":
    main()
