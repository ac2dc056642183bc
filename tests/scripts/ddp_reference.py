"""Fit the L2-SP mixin model of ``test_reference.py`` under DDP on 2 CPU processes, with ``WeightNormMonitor``.

Usage: ``python ddp_reference.py OUT_DIR``. Lightning re-runs this script for the second rank. Writes
``OUT_DIR/csv/version_0/metrics.csv`` (rank 0 logs), ``OUT_DIR/initial.pt`` (the weights before the fit) and
``OUT_DIR/rank{r}.pt`` (each rank's final weights and the references its weight-decay hook holds, by name).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared models and fits

from fits import ddp_trainer
from test_reference import L2SPNet

from lightning_nodecay import WeightDecayHook, WeightNormMonitor


def main(out: Path) -> None:
    model = L2SPNet()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ddp_trainer(out, [WeightNormMonitor()])
    trainer.fit(model)
    names = {id(p): name for name, p in model.named_parameters()}
    hook = WeightDecayHook.of(trainer.optimizers[0])
    assert hook is not None
    references = {names[id(p)]: r.detach().clone() for p, r in hook.references.items()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"weights": weights, "references": references}, out / f"rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        torch.save(initial, out / "initial.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in the test session (tests/conftest.py)
    main(Path(sys.argv[1]))
