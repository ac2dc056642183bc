"""Tests of ``plot_weight_norms``: a PNG from a real CSVLogger file, and clear errors."""

from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
from fits import trainer_kwargs
from models import NoDecayBoringModel

from lightning_nodecay import WeightDecayScheduler, WeightNormMonitor, plot_weight_norms

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_weight_norms_writes_png_from_csv_logger(tmp_path):
    """Test that the metrics.csv of a real fit becomes a non-blank PNG."""
    image = pytest.importorskip("matplotlib.image")

    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=5)
    pl.Trainer(**kwargs, callbacks=[WeightNormMonitor(log_rms=True)]).fit(NoDecayBoringModel())
    png = plot_weight_norms(f"{logger.log_dir}/metrics.csv", tmp_path / "norms.png", log_scale=True)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    pixels = image.imread(png)
    assert pixels.shape[:2] == (450, 800)  # 8 x 4.5 inches at 100 dpi
    assert pixels.std() > 0.05  # lines, labels and legend drawn, not a blank canvas


def test_plot_weight_norms_draws_the_weight_decay_schedule_under_the_norms(tmp_path):
    """Test that `weight_decay=True` draws the `weight_decay/{group}` columns of a real fit's CSV (WeightNormMonitor
    and WeightDecayScheduler on one CSVLogger) in a second panel: a taller PNG, with lines in both panels."""
    image = pytest.importorskip("matplotlib.image")

    logger = pl.loggers.CSVLogger(tmp_path)
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, max_steps=6)
    callbacks = [WeightNormMonitor(), WeightDecayScheduler("cosine", end=0.4, warmup_steps=2)]
    pl.Trainer(**kwargs, callbacks=callbacks).fit(NoDecayBoringModel())
    metrics = f"{logger.log_dir}/metrics.csv"
    with open(metrics) as file:
        header = file.readline().strip().split(",")
    assert {"weight_2.0_norm/decay", "weight_decay/decay", "weight_decay/no_decay"} <= set(header)

    png = plot_weight_norms(metrics, tmp_path / "norms_and_decay.png", weight_decay=True)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = image.imread(png)
    assert pixels.shape[:2] == (700, 800)  # 8 x 7 inches at 100 dpi: the norms above, the weight decay below
    top, bottom = pixels[:380], pixels[420:]
    assert top.std() > 0.05
    assert bottom.std() > 0.05


def test_plot_weight_norms_without_weight_decay_columns_raises(tmp_path):
    """Test that `weight_decay=True` on a file without `weight_decay/{group}` columns is refused, saying how to log
    them, and writes nothing."""
    pytest.importorskip("matplotlib")
    metrics = write_csv(tmp_path / "metrics.csv", ["step", "weight_2.0_norm/decay"], [0, 3.0], [1, 2.0])
    with pytest.raises(
        ValueError, match=r"metrics.csv` holds no `weight_decay/\{group\}` columns.*`lightning_nodecay.WeightDecaySch"
    ):
        plot_weight_norms(metrics, tmp_path / "norms.png", weight_decay=True)
    assert not (tmp_path / "norms.png").exists()
    assert plot_weight_norms(metrics, tmp_path / "norms.png").read_bytes().startswith(PNG_SIGNATURE)  # without


def write_csv(path, header, *rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, row)) for row in rows)]) + "\n")
    return path


def test_plot_weight_norms_chooses_among_several_norms(tmp_path):
    """Test that a file with several norms needs `norm_type`, and plots the chosen one."""
    pytest.importorskip("matplotlib")
    header = ["step", "weight_2.0_norm/decay", "weight_inf_norm/decay", "weight_rms/decay"]
    metrics = write_csv(tmp_path / "metrics.csv", header, [0, 3.0, 1.0, 0.3], [1, 2.0, 0.9, 0.2])
    with pytest.raises(ValueError, match=r"holds several norms \['2.0', 'inf'\]: choose one with `norm_type`"):
        plot_weight_norms(metrics, tmp_path / "norms.png")
    with pytest.raises(ValueError, match=r"holds no 1.0-norm \(`norm_type=1`\)"):
        plot_weight_norms(metrics, tmp_path / "norms.png", norm_type=1)
    assert plot_weight_norms(metrics, tmp_path / "inf.png", norm_type="inf").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_weight_norms_without_norm_columns_raises(tmp_path):
    """Test that a file without weight norms is refused, naming the file and the callback."""
    pytest.importorskip("matplotlib")  # checked first, before the file is read
    metrics = write_csv(tmp_path / "metrics.csv", ["step", "loss", "weight_decay/decay"], [0, 1.0, 0.1])
    with pytest.raises(
        ValueError, match=r"metrics.csv` holds no `weight_\{p\}_norm/\{group\}` columns.*WeightNormMonitor"
    ):
        plot_weight_norms(metrics, tmp_path / "norms.png")


def test_plot_weight_norms_without_matplotlib_raises(tmp_path, monkeypatch):
    """Test that a missing matplotlib gives an error saying how to install it."""
    metrics = write_csv(tmp_path / "metrics.csv", ["step", "weight_2.0_norm/decay"], [0, 1.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    with pytest.raises(ImportError, match=r"pip install lightning-nodecay\[plot\]"):
        plot_weight_norms(metrics, tmp_path / "norms.png")
    assert not (tmp_path / "norms.png").exists()
