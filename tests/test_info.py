"""python -m rcl_kernels.info lists versions, the build, the devices, every candidate with its
availability or reasons, and the tuning cache."""

from __future__ import annotations

import subprocess
import sys

from rcl_kernels import dispatch


def test_info_runs_and_lists_every_candidate():
    out = subprocess.run([sys.executable, "-m", "rcl_kernels.info"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for section in ("versions:", "build:", "devices:", "candidates:", "tuning:"):
        assert section in text
    for name in dispatch.candidate_names():
        assert f"  {name} " in text, name
    assert "CPU ISA in use" in text and "cache file" in text
    assert "triton:one-pass-atomic" in text and "NOT deterministic" in text
