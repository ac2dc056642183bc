import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the example trains on scikit-learn's digits
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MEAN_STD = re.compile(r"^(\d+\.\d+) ± (\d+\.\d+)$")


def run_example(name, *args, cwd):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def table_after(stdout, title):
    """``{first cell: cells}`` of the ``|`` table printed right after the line starting with ``title``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    rows = {}
    for line in lines[start:]:
        if "|" not in line:
            break
        cells = [cell.strip() for cell in line.split("|")]
        if not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_l2sp_digits_quick_three_methods_accuracies_distance_and_png(tmp_path):
    """Test the L2-SP example in quick mode: the three methods fine-tune and are scored on the test split, the
    monitor logs the L2-SP backbone's distance to its pretrained weights, and the PNG is written."""
    result = run_example("l2sp_digits.py", "--quick", "--out", str(tmp_path / "out"), cwd=tmp_path)

    accuracies = table_after(result.stdout, "Test accuracy on digits 5-9")
    assert list(accuracies) == ["method", "no decay", "L2", "L2-SP"]
    assert accuracies["method"] == ["k=5", "seeds"]
    for method in ("no decay", "L2", "L2-SP"):
        cell, seeds = accuracies[method]
        mean, std = (float(v) for v in MEAN_STD.match(cell).groups())
        assert 0.0 <= mean <= 1.0
        assert std == 0.0  # one seed in quick mode
        assert seeds == "1"

    distances = table_after(result.stdout, "Backbone distance to the pretrained weights")
    for method in ("no decay", "L2", "L2-SP"):
        distance = float(MEAN_STD.match(distances[method][0]).group(1))
        assert math.isfinite(distance)
        assert distance > 0.0  # fine-tuning moved every backbone

    logged = re.search(r"distance_to_reference/decay_to_init = (\S+) ± \S+ \(computed: (\S+) ± \S+\)", result.stdout)
    assert logged is not None, result.stdout
    monitor_distance, computed_distance = float(logged.group(1)), float(logged.group(2))
    assert math.isfinite(monitor_distance)
    assert monitor_distance == pytest.approx(computed_distance, abs=2e-3)  # both printed with 3 decimals

    # the monitor's CSV of the L2-SP run has the reference distance of the backbone's group, and only there
    with open(tmp_path / "out" / "L2-SP" / "k5_seed0" / "metrics.csv") as f:
        assert "distance_to_reference/decay_to_init" in f.readline().split(",")
    with open(tmp_path / "out" / "L2" / "k5_seed0" / "metrics.csv") as f:
        assert not any(key.startswith("distance_to_reference") for key in f.readline().split(","))

    png = tmp_path / "out" / "l2sp_digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
