"""Fit ``NoDecayBoringModel`` with ``WeightNormMonitor`` under DDP on 2 CPU processes.

Usage: ``python ddp_monitor.py OUT_DIR``. Lightning re-runs this script for the second rank. Writes
``OUT_DIR/csv/version_0/metrics.csv`` (rank 0 logs) and ``OUT_DIR/final_rank{r}.pt`` (each rank's final weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import NoDecayBoringModel, trainer_kwargs

from lightning_nodecay import WeightNormMonitor


def main(out: Path) -> None:
    model = NoDecayBoringModel()
    trainer = pl.Trainer(
        **trainer_kwargs(
            out,
            strategy="ddp",
            devices=2,
            max_steps=3,
            log_every_n_steps=1,
            logger=pl.loggers.CSVLogger(out, name="csv", version=0),
        ),
        callbacks=[WeightNormMonitor(log_grad_norm=True)],
    )
    trainer.fit(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(weights, out / f"final_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
