"""Smoke test of bench/bench_loss.py: a tiny run end to end, rows and file names checked."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "bench_loss.py")
REQUIRED = ["backend", "mode", "N", "M", "d", "C", "dtype", "median_ms", "p20_ms", "p80_ms",
            "peak_MB", "tflops", "device", "torch", "triton", "commit", "preset", "status",
            "mem_method"]


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_helpers():
    bench = _load_module()
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.device_slug("NVIDIA H200") == "h200"
    assert bench.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert bench.device_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert bench.split_list(["fwd,bwd", "fwdbwd"]) == ["fwd", "bwd", "fwdbwd"]
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)
    assert bench.flop_count("cpu", "fwdbwd", 10, 20, 4)[0] == 8 * 10 * 20 * 4
    assert bench.columns_for("bcl", "cpu", 64, 5) == 69
    assert bench.columns_for("supcon", "cpu", 64, 5) == 64


def test_bench_smoke(tmp_path):
    import torch

    import rcl_kernels as rk

    backends = ["reference"] + (["cpu"] if rk.available_backends()["cpu"] is None else [])
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--backends", ",".join(backends),
           "pml_supcon", "--sizes", "64", "--d", "16", "--C", "5", "--dtypes", "float32",
           "--modes", "fwd,bwd,fwdbwd", "--repeats", "1", "--warmup", "1", "--threads", "1",
           "--out", str(tmp_path), "--tag", "smoke"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elapsed = time.monotonic() - start

    stem = tmp_path / "cpu-smoke"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-smoke.csv", "cpu-smoke.json", "cpu-smoke.png"]
    data = json.loads((stem.with_suffix(".json")).read_text())
    assert data["meta"]["device"] == "cpu"
    assert data["meta"]["torch"] == torch.__version__
    rows = data["rows"]
    with open(stem.with_suffix(".csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert set(REQUIRED) <= set(csv_rows[0])

    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["backend"], r["mode"]) for r in ok} == {
        (b, m) for b in backends for m in ("fwd", "bwd", "fwdbwd")}
    for r in rows:
        assert set(REQUIRED) <= set(r)
    for r in ok:
        assert (r["N"], r["M"], r["d"], r["C"], r["dtype"]) == (64, 69, 16, 5, "float32")
        assert r["device"] == "cpu" and r["preset"] == "bcl" and r["commit"]
        for key in ("median_ms", "p20_ms", "p80_ms", "tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_MB"] is None or r["peak_MB"] >= 0
    # A peer that is not installed gives rows with a reason instead of a crash.
    peer = [r for r in rows if r["backend"] == "pml_supcon"]
    assert peer and all(r["status"] in ("ok", "skipped") for r in peer)
    assert all(r["reason"] for r in peer if r["status"] == "skipped")
    # Generous bound: the machine may be shared; the run itself is a few seconds when idle.
    assert elapsed < 90
