import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # every example trains on scikit-learn's digits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, cwd):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quickstart_prints_summary_and_groups(tmp_path):
    """Test that the quickstart runs end to end, logs the summary and builds both groups."""
    result = run_example("quickstart.py", "--quick", cwd=tmp_path)
    assert "module type `PReLU`: 3 tensors" in result.stderr
    assert "optimizer groups: [('decay', 4, 0.05), ('no_decay', 11, 0.0)]" in result.stdout


def test_cli_example_weight_decay_reaches_decay_group_only(tmp_path):
    """Test the CLI example: YAML weight decay on `decay` only; a command-line override flows through."""
    pytest.importorskip("jsonargparse")
    config = str(EXAMPLES / "config.yaml")
    result = run_example(
        "cli.py", "fit", f"--config={config}", "--quick", "--model.optimizer.weight_decay=0.2", cwd=tmp_path
    )
    assert "AdamW group 'decay': 4 tensors, weight_decay=0.2," in result.stdout
    assert "AdamW group 'no_decay': 11 tensors, weight_decay=0.0," in result.stdout
    assert (tmp_path / "runs" / "cli" / "lightning_logs" / "version_0" / "metrics.csv").is_file()


def test_cli_example_own_optimizer_flag_split_by_safety_net(tmp_path):
    """Test the CLI example with LightningCLI's `--optimizer`: the safety net restores the split."""
    pytest.importorskip("jsonargparse")
    config = str(EXAMPLES / "config.yaml")
    result = run_example(
        "cli.py",
        "fit",
        f"--config={config}",
        "--quick",
        "--optimizer=SGD",
        "--optimizer.lr=0.05",
        "--optimizer.weight_decay=0.01",
        cwd=tmp_path,
    )
    assert "SGD group 'decay': 4 tensors, weight_decay=0.01," in result.stdout
    assert "SGD group 'no_decay': 11 tensors, weight_decay=0.0," in result.stdout
    assert "NoDecayMixin safety net: SGD group `pg1`: moved 11 excluded tensors" in result.stderr


def test_finetune_example_unfrozen_backbone_split(tmp_path):
    """Test the fine-tuning example: the unfrozen backbone joins split; Lightning's own callback is refused."""
    result = run_example("finetune.py", "--quick", cwd=tmp_path)
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs[0] == "epoch 0: [('decay', 2, 0.05), ('no_decay', 7, 0.0)]"
    backbone_groups = "('backbone_decay', 2, 0.05), ('backbone_no_decay', 4, 0.0)"
    assert epochs[1] == f"epoch 1: [('decay', 2, 0.05), ('no_decay', 7, 0.0), {backbone_groups}]"
    assert "holds parameters excluded from weight decay (`backbone.0.bias`" in result.stdout
    assert "use `lightning_nodecay.NoDecayBackboneFinetuning`" in result.stdout


def test_prelu_digits_slopes_kept_without_decay(tmp_path):
    """Test the PReLU experiment: both runs log group norms, the PNG is written, slopes stay larger without decay."""
    pytest.importorskip("matplotlib")
    result = run_example("prelu_digits.py", "--quick", "--out", str(tmp_path / "out"), cwd=tmp_path)
    rows = {line.split("|")[0].strip(): line.split("|") for line in result.stdout.splitlines() if "|" in line}
    plain_slope, nodecay_slope = float(rows["plain"][3]), float(rows["nodecay"][3])
    assert nodecay_slope > plain_slope
    png = tmp_path / "out" / "prelu_digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    for run in ("plain", "nodecay"):
        with open(tmp_path / "out" / run / "version_0" / "metrics.csv") as f:
            header = f.readline().strip().split(",")
        assert {"weight_2.0_norm/decay", "weight_2.0_norm/no_decay", "lr-AdamW/decay"} <= set(header)


def test_vit_llrd_example_groups_follow_the_layers(tmp_path):
    """Test the LLRD example: the fit-start summary has one lr per layer, and at the end every group's lr is the top
    layer's lr x 0.75 ** (layers above it)."""
    result = run_example("vit_llrd.py", "--quick", cwd=tmp_path)
    assert "lr x0.2373: layer 0 of 6 (before `blocks`): 4 tensors (cls_token, pos_embed, patch_embed.weight," in (
        result.stderr
    )
    assert "name pattern `cls_token`: 1 tensor (cls_token)" in result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("  layer")]
    assert [line[0] for line in lines] == [f"layer{i}_{kind}" for i in range(6) for kind in ("decay", "no_decay")]
    lrs = {line[0]: float(line[5].removeprefix("lr=")) for line in lines}
    for name, lr in lrs.items():
        assert lr == pytest.approx(lrs["layer5_decay"] * 0.75 ** (5 - int(name[5])), rel=1e-2), name
    assert {line[6] for line in lines} == {"weight_decay=0.05", "weight_decay=0.0"}
    assert "fine-tuned on all ten digits: validation accuracy" in result.stdout
