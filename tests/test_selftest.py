"""python -m rcl_kernels.selftest: the CPU candidates pass against the float64 oracle; a
deliberately wrong candidate fails, a crashing one is a "crash" and a hanging one a "timeout",
each in its own process, and the verdicts reach the tuning cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from rcl_kernels import autotune, selftest

MUTANTS = str(Path(__file__).with_name("mutant_candidates.py"))


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rcl_kernels.selftest", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_candidates_pass_and_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    out = run("--device", "cpu", "--json", str(tmp_path / "verdicts.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())["cpu"]["verdicts"]
    assert {n: v["verdict"] for n, v in verdicts.items()} == {"cpu:tiled": "pass", "cpu:streaming": "pass"}
    assert all(v["cases"] >= len(selftest.GRID) for v in verdicts.values())
    autotune.clear_memory()
    recorded = autotune.verdicts(autotune.device_model(torch.device("cpu")))
    assert recorded["cpu:tiled"]["verdict"] == "pass"
    autotune.clear_memory()


def test_mutants_fail_crash_and_hang(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    out = run("--device", "cpu", "--plugin", MUTANTS, "--jobs", "3", "--timeout", "120",
              "--candidates", "cpu:perturbed", "cpu:crashing", "--json", str(tmp_path / "v.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    verdicts = json.loads((tmp_path / "v.json").read_text())["cpu"]["verdicts"]
    assert verdicts["cpu:perturbed"]["verdict"] == "fail"
    assert any("loss: relative error" in f for f in verdicts["cpu:perturbed"]["failures"])
    assert verdicts["cpu:crashing"]["verdict"] == "crash"
    assert "exit status 3" in verdicts["cpu:crashing"]["failures"][0]


def test_a_hang_is_a_timeout_verdict():
    result = selftest.run_child("cpu:hanging", "cpu", 30, [MUTANTS])
    assert result["verdict"] == "timeout"


def test_the_rule_rejects_a_nan_and_a_perturbation():
    truth = torch.randn(10, dtype=torch.float64)
    low = truth.float()
    err, allowed = selftest.rule_check(truth.float() * 1.001, low, truth, torch.float32)
    assert err > allowed
    err, allowed = selftest.rule_check(torch.full((10,), float("nan")), low, truth, torch.float32)
    assert not err <= allowed
    err, allowed = selftest.rule_check(low, low, truth, torch.float32)
    assert err <= allowed


def test_bad_arguments_name_the_flag():
    out = run("--candidates", "cpu:nope", timeout=300)
    assert out.returncode == 2 and "--candidates: unknown cpu:nope" in out.stderr
