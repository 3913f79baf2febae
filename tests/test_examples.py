"""examples/train_bcl.py: standalone (run as a script, from another directory), at most 80 lines,
and it learns in a few dozen steps."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_bcl.py"


def test_train_bcl_example_runs_and_learns(tmp_path):
    assert len(EXAMPLE.read_text().splitlines()) <= 80
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "60", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\S+)", proc.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0], proc.stdout
    accuracy = float(re.search(r"balanced accuracy (\S+)", proc.stdout)[1])
    assert accuracy > 0.5, proc.stdout  # chance is 0.1
