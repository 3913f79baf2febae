"""The bench runner: runs cases in subprocesses, times them, writes rows, tables and plots.

Timing, per case and mode, after `warmup` untimed calls (they compile and autotune):
  GPU  triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=(0.5, 0.2, 0.8)): CUDA
       events around each call, the L2 cache flushed before each; median, p20, p80 of the calls.
  CPU  torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=rep_ms / 1000) at the
       case's thread count: blocks of `calls_per_sample` calls, each block one sample, until
       rep_ms have passed. Measurement reports the median and the IQR (p25-p75); the rows carry
       the median and the 20th/80th percentiles of the same per-call block times
       (Measurement.times), so that CPU and GPU rows have the same columns. A call longer than
       ~1/1000 of rep_ms is a block of its own, so slow cases give per-call percentiles.
Peak memory above the inputs, one call after the warm-up:
  GPU  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
       memory_allocated() before the call (the inputs; for "bwd" also the kept forward graph).
  CPU  tracemalloc cannot see torch's allocations, so the kernel's own counters are read:
       malloc_trim(0), then writing "5" to /proc/self/clear_refs resets VmHWM to the current
       VmRSS; the peak is VmHWM after the call minus VmRSS before it (resident memory: outputs,
       gradients and saved autograd state included).
Isolation: every case runs in a fresh subprocess (isolation "case"), or every case of one
environment in one subprocess that is started again after a crash ("env": faster on a GPU
machine, where each start costs seconds; torch.compile is reset between cases). Either way a
crash, an out-of-memory kill or a timeout of a case becomes that case's rows, never the end of
the run, and the results of the modes it finished are kept.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

import cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.abspath(__file__)

COLUMNS = [
    # DESIGN §5
    "backend", "mode", "N", "M", "d", "C", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_MB",
    "tflops", "device", "torch", "triton", "commit",
    # extras
    "impl", "algorithm", "env", "preset", "status", "reason", "matmul_precision", "cpu_model",
    "threads", "timer", "samples", "calls_per_sample", "mem_method", "flops", "flops_formula",
    "device_name", "host", "loadavg_before", "loadavg_after",
]
TIMER_GPU = "triton.testing.do_bench (CUDA events, L2 flushed before each call)"
TIMER_CPU = "torch.utils.benchmark.Timer.blocked_autorange (wall clock)"
RESTART = 3  # a worker's exit status after a sticky CUDA error: start a new one for the rest


# ------------------------------------------------------------------------------------------------
# Where and what: machine, commit, versions
# ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """lscpu's model name (the vendor matters: Intel AVX-512 vs AMD AVX2), else /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, LC_ALL="C")).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100', 'cpu' -> 'cpu'."""
    drop = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}
    stop = re.compile(r"^(\d+gb|pcie|sxm\d*|hbm\d*e?|nvl|mig.*)$")
    kept = []
    for tok in re.split(r"[\s\-_]+", name.lower()):
        if not tok or tok in drop:
            continue
        if stop.match(tok):
            break
        kept.append(re.sub(r"[^a-z0-9]", "", tok))
    return "-".join(t for t in kept if t) or "gpu"


def git_commit(repo: str = REPO) -> str:
    """Short HEAD of `repo`, "+dirty" when the package, the C++/CUDA sources or setup.py differ
    from it."""
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "--",
             "rcl_kernels", "csrc", "setup.py"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    raise OSError("MemAvailable not in /proc/meminfo")


# ------------------------------------------------------------------------------------------------
# Measurements (in the worker)
# ------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class CpuPeakMemory:
    """Resident-memory peak of this process over one call, from the kernel's VmHWM."""

    method = "cpu: VmHWM - VmRSS before (VmHWM reset via /proc/self/clear_refs=5 after malloc_trim)"

    def __init__(self):
        import ctypes

        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def peak_mb(self, fn) -> float:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        result = fn()
        peak = _status_kb("VmHWM")
        del result
        return max(0, peak - base) / 1024.0


def peak_memory(fn, cuda: bool) -> tuple[float | None, str]:
    """(MB above what was allocated before the call, how it was measured)."""
    import torch

    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return ((torch.cuda.max_memory_allocated() - base) / 2**20,
                "cuda: max_memory_allocated - memory_allocated before the call")
    try:
        return CpuPeakMemory().peak_mb(fn), CpuPeakMemory.method
    except (OSError, KeyError) as error:  # no writable clear_refs (not Linux, or a sandbox)
        fn()
        return None, f"unavailable: {error}"


def measure_time(fn, cuda: bool, rep_ms: float, warmup_ms: float) -> dict:
    """median/p20/p80 in ms of fn, and how they were taken (see the module docstring)."""
    if cuda:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                   quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timer": TIMER_GPU,
                "samples": None, "calls_per_sample": None}
    import numpy as np
    import torch
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
              ).blocked_autorange(min_run_time=rep_ms / 1e3)
    median, p20, p80 = (float(x) * 1e3 for x in np.quantile(m.times, [0.5, 0.2, 0.8]))
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timer": TIMER_CPU,
            "samples": len(m.times), "calls_per_sample": m.number_per_run}


def measure_modes(case, modes, cuda: bool, warmup: int, rep_ms: float, warmup_ms: float):
    """Yield (mode, result) for each mode of a built case; a failing mode is a result too."""
    import torch

    for mode in modes:
        res = {"loadavg_before": loadavg(), "threads": torch.get_num_threads()}
        try:
            fn = case.timed(mode)
            for _ in range(warmup):
                fn()
            if cuda:
                torch.cuda.synchronize()
            res["peak_MB"], res["mem_method"] = peak_memory(fn, cuda)
            res.update(measure_time(fn, cuda, rep_ms, warmup_ms), status="ok")
        except torch.OutOfMemoryError as error:
            res.update(status="oom", reason=str(error).splitlines()[0][:300])
        except Exception as error:  # a failing case is a row, not the end of the run
            res.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
        fn = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        res["loadavg_after"] = loadavg()
        yield mode, res


def _cuda_usable() -> bool:
    """False after a sticky CUDA error (illegal address, device assert): the process must go."""
    import torch

    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001  (any error here means the context is gone)
        return False


def worker(job_path: str, results_path: str) -> int:
    """Run the cases of a job file; append one JSON line per case start and per mode result."""
    import torch

    with open(job_path) as f:
        job = json.load(f)
    with open(results_path, "a") as out:
        def emit(record):
            out.write(json.dumps(record) + "\n")
            out.flush()

        for spec in job["cases"]:
            emit({"case": spec["id"], "started": True})
            cuda = spec["device"] == "cuda"
            torch.set_float32_matmul_precision(spec["matmul_precision"])
            if spec["threads"]:
                torch.set_num_threads(spec["threads"])
            torch.compiler.reset()  # each case compiles for itself (isolation "env")
            try:
                case = cases.build(cases.parse_impl(spec["impl"]), spec["preset"], spec["N"],
                                   spec["d"], spec["C"], spec["dtype"], spec["device"],
                                   spec["seed"], spec["imbalance"])
                results = measure_modes(case, spec["modes"], cuda, spec["warmup"],
                                        spec["rep_ms"], spec["warmup_ms"])
            except Exception as error:  # building the inputs failed: every mode says why
                failed = {"status": "error", "reason": f"{type(error).__name__}: {error}"[:500]}
                results = ((mode, failed) for mode in spec["modes"])
            for mode, res in results:
                emit({"case": spec["id"], "mode": mode, **res})
            case = results = None
            if cuda and not _cuda_usable():
                return RESTART
    return 0


# ------------------------------------------------------------------------------------------------
# The parent: subprocesses, their failures, rows
# ------------------------------------------------------------------------------------------------
def _failure(returncode: int | None, stderr_tail: str) -> tuple[str, str]:
    if returncode in (-signal.SIGKILL, 137):
        return "oom", "worker killed (SIGKILL; most likely the out-of-memory killer)"
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        return "error", f"worker died of {name}: {stderr_tail}"[:500]
    return "error", f"worker exited {returncode}: {stderr_tail}"[:500]


def _log_tail(text: str) -> str:
    """The lines of a worker's log that say why it died: the last ones naming an error, else the
    last three."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"(?i)error|exception|abort|killed", line)]
    return " | ".join(telling[-2:] or lines[-3:])


def _launch(specs, env, timeout_s, results, on_progress):
    """One worker over `specs` (in order); fill results[id][mode] as they come, calling
    on_progress(results) after each; return the specs not started. The case that was running
    when the worker died or timed out gets the failure as the rows of its unfinished modes."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        job, lines, log = (os.path.join(tmp, name) for name in ("job.json", "rows.jsonl", "log"))
        with open(job, "w") as f:
            json.dump({"cases": specs}, f)
        open(lines, "w").close()
        with open(log, "w") as log_f:
            cmd = [sys.executable, "-X", "faulthandler", RUNNER, "--worker", job, lines]
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: kill its children too
        started, read_upto = [], 0
        last_start, timed_out = time.monotonic(), False
        try:
            while True:
                done = proc.poll() is not None
                with open(lines) as f:
                    f.seek(read_upto)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                read_upto += len(complete)
                for line in complete.splitlines():
                    rec = json.loads(line)
                    if rec.get("started"):
                        started.append(rec["case"])
                        last_start = time.monotonic()
                    else:
                        results.setdefault(rec["case"], {})[rec["mode"]] = rec
                if complete and on_progress is not None:
                    on_progress(results)
                if done:
                    break
                if time.monotonic() - last_start > timeout_s:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:  # a timeout, or the parent itself stopped (SIGTERM, Ctrl-C)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with open(log) as f:
            tail = _log_tail(f.read())
    by_id = {spec["id"]: spec for spec in specs}
    unfinished = [s for s in started if len(results.get(s, {})) < len(by_id[s]["modes"])]
    failed = unfinished[0] if unfinished else None
    if failed is None and proc.returncode not in (0, RESTART) and len(started) < len(specs):
        failed = specs[len(started)]["id"]  # died before it said it started (e.g. at import)
    if failed is not None:
        if timed_out:
            status, reason = "timeout", f"case exceeded --case-timeout {timeout_s:.0f} s"
        else:
            status, reason = _failure(proc.returncode, tail)
        for mode in by_id[failed]["modes"]:
            results.setdefault(failed, {}).setdefault(mode, {"status": status, "reason": reason})
        started.append(failed)
        if on_progress is not None:
            on_progress(results)
    return [s for s in specs if s["id"] not in started]


def run_cases(specs, isolation: str, timeout_s: float, base_env: dict, on_progress=None) -> dict:
    """Run every spec in worker subprocesses; return {id: {mode: result}}. Specs with the same
    environment share a worker when isolation is "env"; after a crash, a new one takes the rest.
    on_progress(results) is called whenever results arrive."""
    results = {}
    groups = {}
    for spec in specs:
        key = spec["id"] if isolation == "case" else tuple(map(tuple, spec["env"]))
        groups.setdefault(key, []).append(spec)
    for group in groups.values():
        env = dict(base_env, **dict(group[0]["env"]))
        paths = [REPO, os.path.dirname(RUNNER), env.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        pending = group
        while pending:
            pending = _launch(pending, env, timeout_s, results, on_progress)
    return results


def make_rows(specs, results, meta) -> list[dict]:
    rows = []
    for spec in specs:
        impl = cases.parse_impl(spec["impl"])
        for mode in spec["modes"]:
            res = results.get(spec["id"], {}).get(mode) or spec.get("skip") or {
                "status": "not_run", "reason": "the run stopped before this case"}
            flops, formula = cases.flop_count(impl.backend, mode, spec["N"], spec["M"], spec["d"])
            median = res.get("median_ms")
            row = {key: spec.get(key) for key in ("N", "M", "d", "C", "dtype", "preset",
                                                  "matmul_precision", "impl")}
            row.update({key: res.get(key) for key in (
                "median_ms", "p20_ms", "p80_ms", "peak_MB", "timer", "samples",
                "calls_per_sample", "mem_method", "loadavg_before", "loadavg_after")})
            row.update(
                backend=impl.backend, algorithm=impl.algorithm or "", mode=mode,
                env=" ".join(f"{k}={v}" for k, v in spec["env"]),
                tflops=flops / (median * 1e-3) / 1e12 if median else None,
                status=res.get("status"), reason=res.get("reason", ""),
                threads=res.get("threads", meta["threads"]), flops=flops, flops_formula=formula,
                **{key: meta[key] for key in ("device", "device_name", "torch", "triton", "commit",
                                              "cpu_model", "host")},
            )
            rows.append(row)
    return rows


def write_json(path: str, meta: dict, rows: list) -> str:
    """{"meta", "rows"} to path (its folder made), replaced atomically; returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_rows(stem: str, meta: dict, rows: list[dict]) -> None:
    """<stem>.json ({"meta", "rows"}) and <stem>.csv (the rows), each replaced atomically."""
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else
                             " ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]
                             for k in COLUMNS})
    os.replace(stem + ".csv.tmp", stem + ".csv")


# ------------------------------------------------------------------------------------------------
# Reading rows: the table and the plots
# ------------------------------------------------------------------------------------------------
def _precision(r) -> str:
    return "tf32" if r["dtype"] == "float32" and r.get("matmul_precision") in ("high", "medium") \
        else r["dtype"]


REFERENCE_IMPL = "reference"  # the speed-up column divides its time by each implementation's


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(rows) -> str:
    """Markdown: one line per shape (N, M, d, C, dtype), mode and implementation, with the median
    and p20-p80 in ms (3 decimals), TFLOP/s, the speed-up against the eager reference of the same
    shape and mode (its median over this one's; empty where the reference did not run) and the
    peak MB above the inputs; then the rows that did not run, with why."""
    ok = [r for r in rows if r["status"] == "ok"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def shape(r):
        return r["N"], r["M"], r["d"], r["C"], _precision(r), r["mode"]

    reference = {shape(r): r["median_ms"] for r in ok if r["impl"] == REFERENCE_IMPL}
    ok.sort(key=lambda r: (r["d"], r["C"], _precision(r), cases.MODES.index(r["mode"]), r["N"],
                           impls.index(r["impl"])))
    lines = ["| N | M | d | C | dtype | mode | implementation | ms | p20-p80 ms | TFLOP/s | "
             f"vs {REFERENCE_IMPL} | peak MB |", "|---" * 12 + "|"]
    for r in ok:
        ref = reference.get(shape(r))
        speedup = "" if ref is None else f"{ref / r['median_ms']:.2f}x"
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}" if r.get("p20_ms") is not None else ""
        lines.append("| " + " | ".join(map(str, shape(r))) + f" | {r['impl']} | "
                     f"{r['median_ms']:.3f} | {spread} | {_cell(r.get('tflops'), '.3f')} | "
                     f"{speedup} | {_cell(r.get('peak_MB'), '.1f')} |")
    seen = set()
    for r in rows:
        key = (r["impl"], r["status"], r["reason"])
        if r["status"] != "ok" and key not in seen:
            seen.add(key)
            ns = sorted({x["N"] for x in rows if (x["impl"], x["status"], x["reason"]) == key})
            lines.append(f"- {r['impl']} {r['status']} at N={ns}: {r['reason']}")
    return "\n".join(lines)


def _axes_log(ax, ylabel):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N anchors")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _series_rows(ok, series, varying, key):
    return [r for r in ok if (r["impl"],) + tuple(r[k] for k in varying) == key]


def _lines(ax, ok, series, varying, value, colors):
    """Value against N: one color per series, one line style per mode."""
    styles = {"fwd": ":", "bwd": "--", "fwdbwd": "-"}
    for i, key in enumerate(series):
        mine = _series_rows(ok, series, varying, key)
        for mode in cases.MODES:
            pts = sorted((r["N"], max(r[value], 0.01)) for r in mine
                         if r["mode"] == mode and r[value] is not None)
            if pts:
                ax.plot(*zip(*pts), styles[mode], marker="o", color=colors[i % len(colors)],
                        label=" ".join(map(str, key)) + f" {mode}")
    _axes_log(ax, "")


def _bars(ax, ok, series, varying, value, colors):
    """One size: a group of bars per series, one bar per mode (its own color and hatch), each
    labelled with its value."""
    import numpy as np

    modes = [m for m in cases.MODES if any(r["mode"] == m for r in ok)]
    hatches = {"fwd": "//", "bwd": "..", "fwdbwd": ""}
    width = 0.8 / max(1, len(modes))
    x = np.arange(len(series))
    for j, mode in enumerate(modes):
        heights = []
        for key in series:
            vals = [r[value] for r in _series_rows(ok, series, varying, key)
                    if r["mode"] == mode and r[value] is not None]
            heights.append(max(vals[0], 0.01) if vals else np.nan)
        bars = ax.bar(x + (j - (len(modes) - 1) / 2) * width, heights, width, label=mode,
                      color=colors[j % len(colors)], hatch=hatches.get(mode, ""),
                      edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.3g", fontsize=6)
    ax.set_xticks(x, [" ".join(map(str, key)) for key in series], rotation=20, ha="right",
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"implementation, N = {ok[0]['N']}" if ok else "implementation")
    ax.grid(True, axis="y", which="both", alpha=0.3)


def plot(rows, path: str, title: str, kind: str = "time") -> None:
    """kind "time": time and peak memory against N, one color per implementation (and dtype,
    d, C when they vary), one line style per mode; with a single N, grouped bars instead (one
    group per implementation, one bar per mode). kind "crossover": time against N, one panel
    per (d, C, dtype), one line per implementation, forward+backward (or the first mode run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    if kind == "crossover":
        modes = [m for m in cases.MODES if any(r["mode"] == m for r in ok)]
        mode = "fwdbwd" if "fwdbwd" in modes else modes[0] if modes else "fwdbwd"
        panels = sorted({(r["d"], r["C"], _precision(r)) for r in ok})
        fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 5),
                                 squeeze=False)
        for ax, (d, c, prec) in zip(axes[0], panels):
            for i, impl in enumerate(impls):
                pts = sorted((r["N"], r["median_ms"]) for r in ok if r["impl"] == impl and
                             r["mode"] == mode and (r["d"], r["C"], _precision(r)) == (d, c, prec))
                if pts:
                    ax.plot(*zip(*pts), "-", marker="o", color=colors[i % len(colors)], label=impl)
            _axes_log(ax, f"median time, {mode} (ms)")
            ax.set_title(f"d={d} C={c} {prec}", fontsize=9)
            ax.legend(fontsize=7)
    else:
        varying = [k for k in ("dtype", "d", "C") if len({r[k] for r in ok}) > 1]
        series = list(dict.fromkeys((r["impl"],) + tuple(r[k] for k in varying) for r in ok))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
        draw = _bars if len({r["N"] for r in ok}) == 1 else _lines
        for ax, key, ylabel in ((ax_t, "median_ms", "median time (ms)"),
                                (ax_m, "peak_MB", "peak memory above inputs (MB)")):
            draw(ax, ok, series, varying, key, colors)
            ax.set_ylabel(ylabel)
        ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: runner.py --worker JOB.json RESULTS.jsonl (bench/bench_loss.py is the CLI)")
