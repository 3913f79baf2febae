"""bench/gpu_check.sh --dry-run: every script, flag, shape and candidate name the device check
uses exists, and its steps fit its budget (a typo must not burn device minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The script's steps run this interpreter (its PYTHON knob), not whatever `python` is on PATH.
ENV = {**os.environ, "PYTHON": sys.executable}


def test_gpu_check_dry_run_passes():
    out = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gpu_check --dry-run: ok" in out.stdout
    for step in ("build", "selftest", "untimed-n32k", "timed-bcl", "crossover", "table", "sanitize"):
        assert f"  {step} " in out.stdout


def test_gpu_check_dry_run_catches_a_bad_candidate(tmp_path):
    script = (ROOT / "bench/gpu_check.sh").read_text().replace("cuda:mma", "cuda:mmma", 1)
    bad = ROOT / "bench" / ".gpu_check_typo.sh"
    bad.write_text(script)
    try:
        out = subprocess.run(["bash", str(bad), "--dry-run"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=900)
    finally:
        bad.unlink()
    assert out.returncode == 1 and "error: step untimed-n32k" in out.stdout
    # only the misspelt candidate's steps fail: the others check out as in the passing run
    assert "error: step selftest" not in out.stdout and "error: step crossover" not in out.stdout
