"""The bench (bench/runner.py, bench/cases.py, bench/bench_loss.py): the runner end to end at a
tiny CPU size, its handling of crashing and hanging workers, the timer, and the case syntax."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import tomllib

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import cases  # noqa: E402
import runner  # noqa: E402

DESIGN_COLUMNS = ["backend", "mode", "N", "M", "d", "C", "dtype", "median_ms", "p20_ms", "p80_ms",
                  "peak_MB", "tflops", "device", "torch", "triton", "commit"]


def test_implementation_syntax():
    impl = cases.parse_impl("triton{RCL_KERNELS_TRITON_BACKWARD=one_pass}")
    assert impl == cases.Impl("triton", None, (("RCL_KERNELS_TRITON_BACKWARD", "one_pass"),))
    impl = cases.parse_impl("cuda:tiled{A=1,B_2=x=y}")
    assert (impl.backend, impl.algorithm) == ("cuda", "tiled")
    assert impl.env == (("A", "1"), ("B_2", "x=y"))
    assert impl.label == "cuda:tiled{A=1,B_2=x=y}"
    assert cases.parse_impl(impl.label) == impl
    assert cases.parse_impl("reference_compile") == cases.Impl("reference_compile")
    # Commas and spaces separate cases, except inside braces.
    assert cases.split_list(["cpu,cuda:tiled{A=1,B=2} reference", "flash_sdpa"]) == [
        "cpu", "cuda:tiled{A=1,B=2}", "reference", "flash_sdpa"]
    assert cases.parse_env(["X=1", "Y="]) == (("X", "1"), ("Y", ""))


@pytest.mark.parametrize("text, message", [
    ("nope", "unknown backend 'nope'"),
    ("flash_sdpa:tiled", "an algorithm applies to the rk backends"),
    ("triton{1X=2}", "NAME=value"),
    ("triton{X}", "NAME=value"),
    ("triton{X=1", "expected backend[:algorithm|:variant]"),
])
def test_implementation_syntax_errors(text, message):
    with pytest.raises(ValueError, match="--backends") as info:
        cases.parse_impl(text)
    assert message in str(info.value)


def test_env_errors_name_the_option():
    with pytest.raises(ValueError, match="--env: expected NAME=value"):
        cases.parse_env(["NOVALUE"])


def test_flop_formulas():
    n, m, d = 3, 5, 7
    assert [cases.flop_count("cuda", mode, n, m, d)[0] for mode in cases.MODES] == [
        2 * n * m * d, 6 * n * m * d, 8 * n * m * d]
    assert [cases.flop_count("flash_sdpa", mode, n, m, d)[0] for mode in cases.MODES] == [
        4 * n * m * d, 10 * n * m * d, 14 * n * m * d]
    assert cases.flop_count("cpu", "fwdbwd", n, m, d)[1] == "8*N*M*d"
    assert [cases.flop_count("gemm_floor", mode, n, m, d)[0] for mode in cases.MODES] == [
        2 * n * m * d, 4 * n * m * d, 6 * n * m * d]


def test_the_gemm_floor_case_runs_the_three_products_of_the_tiled_algorithm():
    """Forward S = Z·Kᵀ [N, M]; backward P·K and Pᵀ·Z, the shapes of dZ and dK."""
    import torch

    case = cases.build(cases.parse_impl("gemm_floor"), "bcl", 6, 4, 3, "float32", "cpu")
    z, k = case.leaves
    scores = case.forward()
    assert scores.shape == (6, 9) and z.shape == (6, 4) and k.shape == (9, 4)
    dz, dk = case.backward(scores)
    torch.testing.assert_close(dz, case.grad_output @ k.detach())
    torch.testing.assert_close(dk, case.grad_output.T @ z.detach())
    # A worked figure: 8·N·M·d at N = 32,768, M = N + 1000, d = 128 in 12.6 ms is 90 TFLOP/s.
    flops, _ = cases.flop_count("triton", "fwdbwd", 32768, 33768, 128)
    assert flops / 12.6e-3 / 1e12 == pytest.approx(89.9, abs=0.1)
    assert cases.columns_for("bcl", "cpu", 64, 5) == 69
    assert cases.columns_for("rcl", "flash_sdpa", 64, 5) == 69
    assert cases.columns_for("supcon", "cpu", 64, 5) == 64
    assert cases.columns_for("bcl", "pml_supcon", 64, 5) == 64


def test_device_slug():
    assert runner.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert runner.device_slug("NVIDIA H200") == "h200"
    assert runner.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert runner.device_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"


class _Sleepy(torch.autograd.Function):
    """20 ms forward, 40 ms backward."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(0.020)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.040)
        return grad


def test_timer_measures_what_each_mode_runs():
    """The CPU timer times the call of each mode, no more and no less: a forward that sleeps
    20 ms and a backward that sleeps 40 ms read as 20, 40 and 60 ms (a little more on a busy
    machine, never less; a backward timed with its forward would read 60)."""
    x = torch.ones(3, requires_grad=True)
    case = cases.Case(lambda: _Sleepy.apply(x).sum(), (x,))
    results = dict(runner.measure_modes(case, cases.MODES, cuda=False, warmup=1, rep_ms=200,
                                        warmup_ms=0))
    for mode, expected in (("fwd", 20), ("bwd", 40), ("fwdbwd", 60)):
        res = results[mode]
        assert res["status"] == "ok", res
        assert expected <= res["p20_ms"] <= res["median_ms"] <= res["p80_ms"], res
        assert res["median_ms"] < expected + 10, res
        assert res["samples"] >= 2 and res["calls_per_sample"] >= 1
        assert res["timer"] == runner.TIMER_CPU
        assert res["peak_MB"] is None or res["peak_MB"] >= 0


FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    job, lines = sys.argv[2], sys.argv[3]
    with open(job) as f:
        specs = json.load(f)["cases"]
    with open(lines, "a") as out:
        for spec in specs:
            out.write(json.dumps({"case": spec["id"], "started": True}) + "\\n")
            out.flush()
            for mode in spec["modes"]:
                if spec["impl"] == "crash" and mode == "bwd":
                    os.kill(os.getpid(), signal.SIGSEGV)
                if spec["impl"] == "hang":
                    time.sleep(60)
                out.write(json.dumps({"case": spec["id"], "mode": mode, "status": "ok",
                                      "median_ms": 1.0, "pid": os.getpid()}) + "\\n")
                out.flush()
""")


def test_crash_and_hang_become_rows(tmp_path, monkeypatch):
    """One worker per environment: a case that kills its worker, or hangs, becomes that case's
    rows (the modes it finished are kept), and a new worker runs the cases after it."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setattr(runner, "RUNNER", str(fake))
    names = ["ok", "crash", "ok", "hang", "ok"]
    specs = [{"id": i, "impl": name, "env": [], "modes": ["fwd", "bwd"]}
             for i, name in enumerate(names)]
    seen = []
    start = time.monotonic()
    results = runner.run_cases(specs, "env", timeout_s=3, base_env=dict(os.environ),
                               on_progress=lambda r: seen.append(len(r)))
    assert time.monotonic() - start < 30
    assert [results[i]["fwd"]["status"] for i in range(5)] == ["ok", "ok", "ok", "timeout", "ok"]
    assert [results[i]["bwd"]["status"] for i in range(5)] == [
        "ok", "error", "ok", "timeout", "ok"]
    assert "SIGSEGV" in results[1]["bwd"]["reason"]
    assert "--case-timeout 3" in results[3]["bwd"]["reason"]
    pids = [results[i]["fwd"].get("pid") for i in (0, 1, 2, 4)]
    assert pids[0] == pids[1] != pids[2] != pids[3]  # a new worker after the crash and the hang
    assert seen and seen[-1] == 5


def test_runner_end_to_end(tmp_path):
    """The CLI at a tiny CPU size: rows for every case and mode with every column, the commit and
    the CPU model in each; a case the API refuses and one that cannot run here are rows too."""
    import rcl_kernels as rk

    fused = "cpu" if rk.available_backends()["cpu"] is None else None
    backends = ["reference", "reference:bogus", "triton"] + ([fused] if fused else [])
    cmd = [sys.executable, os.path.join(BENCH, "bench_loss.py"), "--device", "cpu",
           "--backends", ",".join(backends), "--sizes", "64", "--d", "16", "--C", "5",
           "--modes", "fwd,bwd,fwdbwd", "--rep-ms", "20", "--warmup", "1", "--threads", "1",
           "--out", str(tmp_path), "--tag", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cpu-smoke.csv", "cpu-smoke.json", "cpu-smoke.png"]

    data = json.loads((tmp_path / "cpu-smoke.json").read_text())
    rows = data["rows"]
    with open(tmp_path / "cpu-smoke.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == runner.COLUMNS
        csv_rows = list(reader)
    assert set(DESIGN_COLUMNS) <= set(runner.COLUMNS)
    assert len(csv_rows) == len(rows) == 3 * len(backends)
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (b, m) for b in backends for m in cases.MODES}
    model = runner.cpu_model()
    for r in rows:
        assert set(runner.COLUMNS) <= set(r)
        assert r["commit"] and r["commit"] != "unknown"
        assert r["cpu_model"] == model and model
        assert (r["N"], r["M"], r["d"], r["C"], r["dtype"], r["device"]) == (
            64, 69, 16, 5, "float32", "cpu")
        assert r["torch"] == torch.__version__ and r["preset"] == "bcl"
    by_impl = {b: [r for r in rows if r["impl"] == b] for b in backends}
    for impl in ["reference"] + ([fused] if fused else []):
        for r in by_impl[impl]:
            assert r["status"] == "ok", r
            assert r["threads"] == 1 and r["samples"] >= 1
            for key in ("median_ms", "p20_ms", "p80_ms", "tflops"):
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["peak_MB"] is None or r["peak_MB"] >= 0
    # The API refuses the algorithm (TypeError before algorithm= exists, ValueError after).
    for r in by_impl["reference:bogus"]:
        assert r["status"] == "error" and r["algorithm"] == "bogus"
        assert "algorithm" in r["reason"] and r["median_ms"] is None
    for r in by_impl["triton"]:
        assert r["status"] == "skipped" and "cuda" in r["reason"]


def test_isolation_env_shares_a_worker_and_sets_the_case_env(tmp_path):
    """--isolation env with a case environment: the variable reaches that case's worker (a bad
    PYTHONHOME stops the interpreter, which becomes an error row), the others still run."""
    cmd = [sys.executable, os.path.join(BENCH, "bench_loss.py"), "--device", "cpu",
           "--backends", "reference,reference{PYTHONHOME=/nonexistent}", "--sizes", "32", "48",
           "--d", "8", "--C", "3", "--modes", "fwd", "--rep-ms", "10", "--warmup", "0",
           "--threads", "1", "--isolation", "env", "--plot", "none", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cpu-bcl.json").read_text())["rows"]
    status = {(r["impl"], r["N"]): r["status"] for r in rows}
    assert status == {("reference", 32): "ok", ("reference", 48): "ok",
                      ("reference{PYTHONHOME=/nonexistent}", 32): "error",
                      ("reference{PYTHONHOME=/nonexistent}", 48): "error"}
    assert all(r["env"] == "PYTHONHOME=/nonexistent" for r in rows if r["status"] == "error")


def test_benchmark_suite_is_not_in_make_test():
    """`make test` runs `pytest -q`, which collects testpaths only: the pytest-benchmark suite in
    bench/ runs through `make bench`."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_check.sh")], check=True)


def _row(impl, mode, median, n=64, peak=1.5):
    return {"impl": impl, "mode": mode, "N": n, "M": n + 5, "d": 16, "C": 5, "dtype": "float32",
            "matmul_precision": "highest", "status": "ok", "reason": "", "median_ms": median,
            "p20_ms": median * 0.9, "p80_ms": median * 1.1, "peak_MB": peak,
            "tflops": 8 * n * (n + 5) * 16 / (median * 1e-3) / 1e12}


def test_table_has_fixed_decimals_tflops_and_speedup():
    """One line per shape, mode and implementation: ms with 3 decimals (never 1.97e+03), TFLOP/s,
    and the eager reference's median over this implementation's for the same shape and mode."""
    rows = [_row("reference", "fwdbwd", 1970.0), _row("cpu", "fwdbwd", 492.5),
            _row("cpu", "fwd", 0.00123), {**_row("triton", "fwd", 1.0), "status": "skipped",
                                          "reason": "needs cuda", "median_ms": None}]
    text = runner.table(rows)
    assert "e+" not in text and "e-" not in text
    header, _, *lines = text.splitlines()
    assert "TFLOP/s" in header and "vs reference" in header
    cells = {(line.split("|")[6].strip(), line.split("|")[7].strip()): line.split("|")
             for line in lines if line.startswith("|")}
    assert cells[("fwdbwd", "cpu")][8].strip() == "492.500"
    assert cells[("fwdbwd", "cpu")][11].strip() == "4.00x"
    assert cells[("fwdbwd", "reference")][11].strip() == "1.00x"
    assert cells[("fwd", "cpu")][8].strip() == "0.001"
    assert cells[("fwd", "cpu")][11].strip() == ""  # no reference row for fwd
    assert float(cells[("fwdbwd", "cpu")][10]) == pytest.approx(rows[1]["tflops"], abs=1e-3)
    assert "- triton skipped at N=[64]: needs cuda" in text


def test_single_size_plots_grouped_bars(tmp_path, monkeypatch):
    """With one N the time plot is a group of bars per implementation, one bar per mode, each
    mode with its own color and hatch and its height the median; with several N it has lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [_row(impl, mode, t * k) for impl, t in (("reference", 10.0), ("cpu", 2.0))
            for k, mode in enumerate(cases.MODES, start=1)]
    fig, ax = plt.subplots()
    series = [("reference",), ("cpu",)]
    runner._bars(ax, rows, series, [], "median_ms", ["C0", "C1", "C2"])
    assert len(ax.patches) == len(series) * len(cases.MODES)
    labels = ax.get_legend_handles_labels()[1]
    assert labels == list(cases.MODES)
    by_mode = [ax.patches[i * 2:(i + 1) * 2] for i in range(len(cases.MODES))]
    assert len({bars[0].get_hatch() for bars in by_mode}) == len(cases.MODES)
    assert len({bars[0].get_facecolor() for bars in by_mode}) == len(cases.MODES)
    assert [b.get_height() for b in by_mode[2]] == pytest.approx([30.0, 6.0])
    plt.close(fig)

    drawn = []
    for name in ("_bars", "_lines"):
        monkeypatch.setattr(runner, name, lambda *a, name=name: drawn.append(name))
    runner.plot(rows, str(tmp_path / "one.png"), "one size")
    runner.plot(rows + [_row("cpu", "fwd", 9.0, n=128)], str(tmp_path / "two.png"), "two sizes")
    assert drawn == ["_bars", "_bars", "_lines", "_lines"]
    assert (tmp_path / "one.png").stat().st_size > 0


def test_busy_neighbour_times_every_implementation_quiet_and_busy(tmp_path):
    """bench/busy_neighbour.py end to end at a tiny size: each implementation has a quiet and a
    busy time per round, and its slowdown is the ratio of their medians."""
    import busy_neighbour

    assert busy_neighbour.main(["--shapes", "64:16:4", "--backends", "reference", "cpu:tiled",
                                "--rep-ms", "20", "--rounds", "2", "--out", str(tmp_path),
                                "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "cpu-t.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["reference", "cpu:tiled"]
    for r in rows:
        assert len(r["quiet_rounds_ms"]) == len(r["busy_rounds_ms"]) == 2
        assert all(t > 0 for t in r["quiet_rounds_ms"] + r["busy_rounds_ms"])
        assert r["slowdown"] == pytest.approx(r["busy_ms"] / r["quiet_ms"], rel=1e-3)


def test_compare_trees_times_each_tree_in_its_own_process(tmp_path):
    """bench/compare_trees.py end to end, this checkout against itself at a tiny size: a row per
    shape and implementation with both trees' times and their ratio."""
    import compare_trees

    assert compare_trees.main(["--trees", REPO, REPO, "--shapes", "40:8", "--impls", "cpu:tiled",
                               "reference", "--turns", "2", "--rounds", "2", "--out",
                               str(tmp_path), "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "cpu-t.json").read_text())["rows"]
    assert [(r["N"], r["d"], r["impl"]) for r in rows] == [(40, 8, "cpu:tiled"),
                                                           (40, 8, "reference")]
    for r in rows:
        assert r["before_min_ms"] > 0 and r["after_min_ms"] > 0
        assert r["after_over_before_min"] == pytest.approx(
            r["after_min_ms"] / r["before_min_ms"], rel=1e-2)


def test_compare_trees_refuses_a_tree_without_the_package(tmp_path):
    import compare_trees

    with pytest.raises(SystemExit, match="holds no rcl_kernels/ package"):
        compare_trees.main(["--trees", str(tmp_path), REPO])


def test_cpu_exp_accuracy_check_catches_a_wrong_exp():
    """bench/cpu_exp.py's accuracy check: exp in float32 rounded once passes; an exp off by 1e-6
    relative, or one that gives 0 above the flush point, does not."""
    import numpy as np

    import cpu_exp

    x, _ = cpu_exp.sweep(torch.float32, 20_000)
    arg = x.numpy().ravel()
    exact = np.exp(arg.astype(np.float64)).astype(np.float32)
    good = cpu_exp.accuracy(arg, exact, cutoff=-80.0)
    assert good["max_ulp"] <= 0.5 + 1e-6 and good["checked"] > 30_000 and good["below_cutoff"] > 0
    assert not good["flushes"]
    flushed = cpu_exp.accuracy(arg, np.where(arg < -80, np.float32(0), exact), cutoff=-80.0)
    assert flushed["flushes"] and flushed["max_ulp"] == good["max_ulp"]
    scaled = cpu_exp.accuracy(arg, exact * np.float32(1 + 1e-6), cutoff=-80.0)
    assert scaled["max_ulp"] > cpu_exp.MAX_ULP
    early = cpu_exp.accuracy(arg, np.where(arg < -70, np.float32(0), exact), cutoff=-80.0)
    assert early["max_rel_err"] == 1.0 and early["max_ulp"] > cpu_exp.MAX_ULP


def test_cpu_exp_refuses_a_cpu_without_the_isa():
    import cpu_exp

    with pytest.raises(SystemExit, match="lacks avx512bw, avx512vl.*--isa avx2"):
        cpu_exp.require_isa("avx512", {"avx512f", "avx512dq", "fma", "avx2"})
    with pytest.raises(SystemExit, match="lacks avx2, fma, which the avx2 build needs$"):
        cpu_exp.require_isa("avx2", set())


@pytest.mark.slow
def test_cpu_exp_bench_runs(tmp_path):
    """The exp bench end to end at a tiny size, AVX2 build only (the build is cached under
    build/cpu_exp; the first takes about a minute)."""
    import cpu_exp

    if not {"avx2", "fma"} <= cpu_exp.cpu_flags():
        pytest.skip("the CPU lacks AVX2 + FMA")
    out = tmp_path / "exp.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "cpu_exp.py"), "--isa", "avx2", "--shapes", "3x37",
         "--rounds", "2", "--reps", "2", "--sweep-points", "5000", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] == torch.__version__
    (f32, f64) = data["results"]
    assert set(f32["timing"]) == {"hand avx2", "sleef avx2", "sleef+flush avx2", "exp_u20 avx2",
                                  "exp_u20+flush avx2", "at::exp_"}
    assert "exp_u20 avx2" not in f64["timing"]
    for res in (f32, f64):
        for label, timing in res["timing"].items():
            assert timing["passes"] == 4 and timing["ns_per_element_min"] > 0, label
        for acc in (res["accuracy_block"], res["accuracy_sweep"]):
            assert acc["hand avx2"]["max_ulp"] <= cpu_exp.MAX_ULP and acc["hand avx2"]["flushes"]
            assert acc["sleef avx2"]["max_ulp"] <= cpu_exp.MAX_ULP
            assert acc["sleef+flush avx2"]["flushes"]
    assert "| float64 | 3×37 | hand avx2 |" in proc.stdout
