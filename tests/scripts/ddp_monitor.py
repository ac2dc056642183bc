"""Fit a mixin model with a hand-written optimizer and ``WeightNormMonitor`` under DDP on 2 CPU processes.

The optimizer puts every parameter in one decayed group, so the mixin's safety net must split it on
every rank. Usage: ``python ddp_monitor.py OUT_DIR``. Lightning re-runs this script for the second
rank. Writes ``OUT_DIR/csv/version_0/metrics.csv`` (rank 0 logs), ``OUT_DIR/final_rank{r}.pt`` (each
rank's final weights) and ``OUT_DIR/groups_rank{r}.json`` (each rank's optimizer groups).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared models and fits

from fits import ddp_trainer
from models import NoDecayBoringModel

from lightning_nodecay import WeightNormMonitor


class HandWrittenOptimizer(NoDecayBoringModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


def main(out: Path) -> None:
    model = HandWrittenOptimizer()
    trainer = ddp_trainer(out, [WeightNormMonitor(log_grad_norm=True)])
    trainer.fit(model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(weights, out / f"final_rank{trainer.global_rank}.pt")
    groups = [(g.get("name"), len(g["params"]), g["weight_decay"]) for g in trainer.optimizers[0].param_groups]
    (out / f"groups_rank{trainer.global_rank}.json").write_text(json.dumps(groups))


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in the test session (tests/conftest.py)
    main(Path(sys.argv[1]))
