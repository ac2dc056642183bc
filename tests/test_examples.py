import subprocess
import sys
from pathlib import Path

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
