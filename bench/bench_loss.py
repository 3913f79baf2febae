#!/usr/bin/env python
"""Speed and peak memory of the contrastive loss per backend, with baselines (DESIGN §5).

Times forward, backward and forward+backward of one preset (bcl by default) for every backend
that runs on the device, plus baselines in the same run:
  reference          rk.contrastive_loss(..., backend="reference"), eager (materializes N x M);
  reference_compile  the same call under torch.compile;
  flash_sdpa         PyTorch flash attention, q=Z [1,1,N,d], k=v=K [1,1,M,d], bf16, forward and
                     backward with the flash backend forced: the physical-limit proxy (our op does
                     4 of attention's 7 matrix products); GPU by default;
  pml_supcon         pytorch-metric-learning SupConLoss (a SupCon peer, M = N), where installed;
  infcl              Inf-CL cal_inf_loss (q = Z, k = K, labels = arange(N)), where installed.

Every (backend, N, dtype) group runs in a fresh subprocess, one mode after the other:
  timing  CUDA events around each call (GPU) or time.perf_counter (CPU); median, p20 and p80 of
          --repeats calls after --warmup calls. "bwd" times the backward alone, after an untimed
          forward; "fwd" runs with gradients enabled (it saves what the backward needs).
  memory  peak above the inputs, measured on one call after the warm-up:
          GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
               memory allocated before the call (the inputs; for "bwd" also the saved graph);
          CPU: tracemalloc cannot see torch's allocations, so the kernel's own counters are used:
               malloc_trim(0), then /proc/self/clear_refs "5" resets VmHWM to the current VmRSS;
               peak = VmHWM after the call − VmRSS before it (resident memory, includes outputs,
               gradients and saved autograd state; the column mem_method says which was used).
Sizes whose N x M reference would exceed --mem-budget-gb (estimate ~6·N·M·bytes) are skipped and
the skip is recorded with its reason; a crash, OOM or timeout of a case becomes a row with status
"error"/"oom"/"timeout", never a crash of the run.

FLOP model (DESIGN §1, explicit so TFLOP/s are comparable): forward 2·N·M·d (one product),
backward 6·N·M·d (recompute + 2 products), forward+backward 8·N·M·d. flash_sdpa rows use
attention's own count (forward 4·N·M·d, backward 10·N·M·d, together 14·N·M·d).

Output: <out>/<device>-<tag>.json ({"meta", "rows"}), .csv (rows) and .png (time and memory
against N per backend); device is "cpu" or a slug of the GPU name ("h100").

Example:
  python bench/bench_loss.py --device cpu --sizes 1024 2048 4096 8192 --modes fwd,bwd,fwdbwd
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_MARK = "BENCH_ROWS_JSON:"

COLUMNS = [
    "backend", "mode", "N", "M", "d", "C", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_MB",
    "tflops", "device", "torch", "triton", "commit",
    # extras
    "preset", "status", "reason", "timer", "cpu_time_median_ms", "cpu_time_p20_ms",
    "cpu_time_p80_ms", "repeats", "warmup", "mem_method", "flops",
    "flops_formula", "threads", "first_call_s", "loadavg_before", "loadavg_after", "host", "code_hash",
]
MODES = ("fwd", "bwd", "fwdbwd")
PRESETS = ("bcl", "supcon", "rcl")
FUSED = ("cpu", "cuda", "triton")
BASELINES = ("reference", "reference_compile", "flash_sdpa")
PEERS = ("pml_supcon", "infcl")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Backends that materialize N x M matrices (and so are skipped above the memory budget).
MATERIALIZING = ("reference", "reference_compile", "pml_supcon")
TEMPERATURE = 0.1


# ------------------------------------------------------------------------------------------------
# Small helpers (no torch needed)
# ------------------------------------------------------------------------------------------------
def split_list(values):
    """['a,b', 'c'] -> ['a', 'b', 'c']."""
    out = []
    for value in values or []:
        out.extend(part for part in re.split(r"[,\s]+", str(value)) if part)
    return out


def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def flop_count(backend, mode, n, m, d):
    if backend == "flash_sdpa":
        per = {"fwd": 4, "bwd": 10, "fwdbwd": 14}[mode]
        return per * n * m * d, f"attention: {per}*N*M*d"
    per = {"fwd": 2, "bwd": 6, "fwdbwd": 8}[mode]
    return per * n * m * d, f"{per}*N*M*d"


def columns_for(preset, backend, n, c):
    """M, the number of columns the loss contrasts each anchor with."""
    if backend in ("pml_supcon",):
        return n
    if backend in ("flash_sdpa", "infcl"):
        return n + c if preset in ("bcl", "rcl") else n
    return n + c if preset in ("bcl", "rcl") else n


def device_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100', 'cpu' -> 'cpu'."""
    tokens = re.split(r"[\s\-_]+", name.lower())
    drop = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}
    stop = re.compile(r"^(\d+gb|pcie|sxm\d*|hbm\d*e?|nvl|mig.*)$")
    kept = []
    for tok in tokens:
        if not tok or tok in drop:
            continue
        if stop.match(tok):
            break
        kept.append(re.sub(r"[^a-z0-9]", "", tok))
    return "-".join(t for t in kept if t) or "gpu"


def git_commit():
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--",
             "rcl_kernels", "csrc", "setup.py"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def code_state():
    """What exactly is measured: a hash of rcl_kernels/*.py, csrc/** and the built extension,
    the extension's mtime, and the tracked files modified since the commit."""
    import glob
    import hashlib

    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(REPO, "rcl_kernels", "*.py"))
                   + glob.glob(os.path.join(REPO, "csrc", "**", "*.*"), recursive=True))
    ext = sorted(glob.glob(os.path.join(REPO, "rcl_kernels", "_C*.so")))
    for path in files + ext:
        try:
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, REPO).encode() + b"\0" + f.read())
        except OSError:
            pass
    state = {"code_hash": digest.hexdigest()[:16]}
    if ext:
        state["extension"] = os.path.relpath(ext[0], REPO)
        state["extension_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                 time.gmtime(os.path.getmtime(ext[0])))
    try:
        state["modified_since_commit"] = subprocess.run(
            ["git", "-C", REPO, "diff", "--name-only", "HEAD", "--", "rcl_kernels", "csrc",
             "setup.py"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------
# The worker: one (backend, N, dtype) group in a fresh process
# ------------------------------------------------------------------------------------------------
def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class CpuPeakMemory:
    """Resident-memory peak of this process over a region, from the kernel's VmHWM."""

    method = "cpu: VmHWM - VmRSS (HWM reset via /proc/self/clear_refs=5 after malloc_trim)"

    def __init__(self):
        import ctypes

        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
        except (OSError, AttributeError):
            self._libc = None
        self.available = True
        try:
            self._reset()
            _status_kb("VmHWM")
        except (OSError, KeyError):
            self.available = False

    def _reset(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self):
        import gc

        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self._reset()
        self._base = _status_kb("VmRSS")

    def stop_mb(self):
        return max(0, _status_kb("VmHWM") - self._base) / 1024.0


def _make_case(spec, torch, device):
    """Inputs and (forward, backward) closures for one backend. forward() returns (out, grad_out);
    backward(out, grad_out) returns the gradients of the inputs."""
    import torch.nn.functional as F

    backend, preset = spec["backend"], spec["preset"]
    n, d, c = spec["N"], spec["d"], spec["C"]
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(spec["seed"])
    views = 2 if n % 2 == 0 else 1
    b = n // views
    labels = torch.randint(0, c, (b,), generator=gen).to(device)
    feats = F.normalize(torch.randn(b, views, d, generator=gen), dim=-1)
    centers = F.normalize(torch.randn(c, d, generator=gen), dim=-1)
    feats = feats.to(device=device, dtype=dtype).requires_grad_()
    centers = centers.to(device=device, dtype=dtype).requires_grad_()

    if backend == "flash_sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        m = spec["M"]
        bf = torch.bfloat16
        q = F.normalize(torch.randn(1, 1, n, d, generator=gen), dim=-1).to(device, bf)
        kv = F.normalize(torch.randn(1, 1, m, d, generator=gen), dim=-1).to(device, bf)
        q.requires_grad_()
        kv.requires_grad_()
        grad_out = torch.randn(1, 1, n, d, generator=gen).to(device, bf)

        def forward():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, kv, kv)
            return out, grad_out

        def backward(out, g):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.autograd.grad(out, (q, kv), g)

        return forward, backward

    leaves = (feats, centers) if preset in ("bcl", "rcl") else (feats,)

    if backend == "pml_supcon":
        from pytorch_metric_learning.losses import SupConLoss

        loss_fn = SupConLoss(temperature=TEMPERATURE)
        flat_labels = labels.repeat(views)
        leaves = (feats,)

        def loss():
            return loss_fn(feats.transpose(0, 1).reshape(n, d), flat_labels)

    elif backend == "infcl":
        from inf_cl import cal_inf_loss

        leaves = (feats, centers)

        def loss():
            z = feats.transpose(0, 1).reshape(n, d)
            k = torch.cat([z, centers]) if preset in ("bcl", "rcl") else z
            return cal_inf_loss(z, k, scale=1.0 / TEMPERATURE).mean()

    else:
        import rcl_kernels as rk

        rk_backend = "reference" if backend == "reference_compile" else backend
        if preset == "bcl":
            def call(f, y, p):
                return rk.bcl_loss(f, y, p, temperature=TEMPERATURE, backend=rk_backend)
            args = (feats, labels, centers)
        elif preset == "supcon":
            def call(f, y):
                return rk.supcon_loss(f, y, temperature=TEMPERATURE, base_temperature=0.07,
                                      backend=rk_backend, num_classes=c)
            args = (feats, labels)
        else:  # rcl on BCL: long-tailed prior (imbalance 100), feature scale, tail margin
            counts = torch.tensor([max(1, round(500 * 0.01 ** (i / max(1, c - 1))))
                                   for i in range(c)])

            def call(f, y, p):
                return rk.rcl_loss(f, y, p, counts, temperature=TEMPERATURE, feature_scale=1.2,
                                   tail_margin=0.1, backend=rk_backend)
            args = (feats, labels, centers)
        if backend == "reference_compile":
            call = torch.compile(call)

        def loss():
            return call(*args)

    one = None

    def forward():
        return loss(), one

    def backward(out, g):
        return torch.autograd.grad(out, leaves, g)

    return forward, backward


def _time_calls(torch, mode, forward, backward, repeats, cuda, cpu_times=None):
    """List of wall-clock milliseconds, one per call; on the CPU, the process CPU time of each
    call (all threads) is appended to cpu_times."""
    times = []
    if cuda:
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            out = None
            if mode == "fwd":
                start.record()
                out = forward()
                end.record()
            elif mode == "bwd":
                out = forward()
                start.record()
                backward(*out)
                end.record()
            else:
                start.record()
                backward(*forward())
                end.record()
            pairs.append((start, end))
            out = None  # noqa: F841
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in pairs]
    for _ in range(repeats):
        if mode == "fwd":
            c0, t0 = time.process_time(), time.perf_counter()
            out = forward()
            t1, c1 = time.perf_counter(), time.process_time()
        elif mode == "bwd":
            out = forward()
            c0, t0 = time.process_time(), time.perf_counter()
            backward(*out)
            t1, c1 = time.perf_counter(), time.process_time()
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            backward(*forward())
            t1, c1 = time.perf_counter(), time.process_time()
        out = None  # noqa: F841
        times.append((t1 - t0) * 1e3)
        if cpu_times is not None:
            cpu_times.append((c1 - c0) * 1e3)
    return times


def _run_once(mode, forward, backward):
    if mode == "fwd":
        return forward()
    out = forward()
    return backward(*out)


def worker(spec):
    """Run every mode of one (backend, N, dtype) group; print the rows as one JSON line."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision(spec["matmul_precision"])
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = {}
    t0 = time.perf_counter()
    code_hash = code_state().get("code_hash")  # what this process imports (the tree may change)
    forward, backward = _make_case(spec, torch, device)
    first = None
    cpu_mem = None if cuda else CpuPeakMemory()
    for mode in spec["modes"]:
        res = {"loadavg_before": loadavg()}
        try:
            # Warm-up (the first call also compiles, for reference_compile). With --warmup 0
            # the memory call below is the first call (lazy initialization then counts in it).
            w0 = time.perf_counter()
            for _ in range(spec["warmup"]):
                _run_once(mode, forward, backward)
                sync()
                if first is None:
                    first = time.perf_counter() - w0
            # Peak memory above the inputs, one call.
            if cuda:
                import gc

                gc.collect()
                if mode == "bwd":
                    out = forward()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    grads = backward(*out)
                else:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    grads = _run_once(mode, forward, backward)
                torch.cuda.synchronize()
                res["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                res["mem_method"] = ("cuda: max_memory_allocated - memory_allocated before the "
                                     "call (inputs" + (" + saved graph)" if mode == "bwd" else ")"))
                del grads
            elif cpu_mem.available:
                if mode == "bwd":
                    out = forward()
                    cpu_mem.start()
                    grads = backward(*out)
                else:
                    cpu_mem.start()
                    grads = _run_once(mode, forward, backward)
                res["peak_MB"] = cpu_mem.stop_mb()
                res["mem_method"] = cpu_mem.method + (
                    "; base includes inputs + saved graph" if mode == "bwd" else
                    "; base includes inputs")
                out = grads = None
            else:
                res["peak_MB"] = None
                res["mem_method"] = "unavailable: /proc/self/clear_refs not writable"
                _run_once(mode, forward, backward)
            if first is None:
                first = time.perf_counter() - w0
            cpu_times = None if cuda else []
            times = _time_calls(torch, mode, forward, backward, spec["repeats"], cuda, cpu_times)
            res.update(status="ok", median_ms=statistics.median(times),
                       p20_ms=percentile(times, 20), p80_ms=percentile(times, 80))
            if cpu_times:
                res.update(cpu_time_median_ms=statistics.median(cpu_times),
                           cpu_time_p20_ms=percentile(cpu_times, 20),
                           cpu_time_p80_ms=percentile(cpu_times, 80))
        except torch.OutOfMemoryError as error:  # noqa: PERF203
            res.update(status="oom", reason=str(error).splitlines()[0][:300])
        except Exception as error:  # a failing case must not stop the run
            res.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
        res["loadavg_after"] = loadavg()
        res["first_call_s"] = first
        res["code_hash"] = code_hash
        results[mode] = res
        if cuda:
            torch.cuda.empty_cache()
    results["_setup_s"] = time.perf_counter() - t0
    print(WORKER_MARK + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--backends", nargs="+", default=None,
                   help="comma/space list; default: every available backend for the device plus "
                        "the baselines and peers. Known: " + ", ".join(FUSED + BASELINES + PEERS))
    p.add_argument("--sizes", nargs="+", default=None,
                   help="N (anchors); default cpu: 1024 2048 4096 8192, cuda: 8192 .. 131072")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--dtypes", nargs="+", default=["float32"])
    p.add_argument("--modes", nargs="+", default=["fwd,bwd,fwdbwd"])
    p.add_argument("--preset", choices=PRESETS, default="bcl")
    p.add_argument("--repeats", type=int, default=None, help="default cuda 50, cpu 10")
    p.add_argument("--warmup", type=int, default=None, help="default cuda 10, cpu 2")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--tag", default=None, help="file name: <device>-<tag>; default the preset")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip materializing baselines whose estimate 6*N*M*bytes exceeds this; "
                        "default: 90%% of GPU memory, or 50%% of MemAvailable on the CPU")
    p.add_argument("--compile-max-n", type=int, default=None,
                   help="largest N for reference_compile (default: none on GPU, 8192 on CPU)")
    p.add_argument("--case-timeout", type=float, default=1800.0,
                   help="seconds per (backend, N, dtype) subprocess")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-time", choices=("median_ms", "cpu_time_median_ms"), default="median_ms",
                   help="time column the PNG shows (cpu_time_median_ms: process CPU time, for "
                        "threads=1 runs on a shared machine)")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                   help="torch.set_float32_matmul_precision in every case: float32 inputs of the "
                        "fused backends and of the reference use TF32 with high/medium on a GPU")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def _skip_reason(backend, spec, args, torch, rk_available, compile_max_n, budget_gb):
    device = spec["device"]
    if backend in FUSED:
        reason = rk_available.get(backend)
        if reason:
            return f"backend unavailable: {reason}"
        if backend == "cpu" and device != "cpu":
            return "the cpu backend runs on cpu tensors only"
        if backend == "cuda" and device != "cuda":
            return "the cuda backend runs on cuda tensors only"
        if backend == "triton" and device != "cuda":
            return "triton runs on the CPU only interpreted (TRITON_INTERPRET=1); not benchmarked"
    elif backend == "reference_compile":
        if not hasattr(torch, "compile"):
            return "torch.compile unavailable"
        if device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            return "torch.compile on the CPU needs a C++ compiler (none on PATH)"
        if compile_max_n is not None and spec["N"] > compile_max_n:
            return (f"compile skipped above N={compile_max_n} on {device} (compile time and the "
                    "N x M buffers; --compile-max-n)")
    elif backend == "flash_sdpa":
        if device != "cuda":
            return ("flash attention proxy is a GPU baseline (pass --device cuda); not run on the "
                    "CPU by default")
    elif backend == "pml_supcon":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning not installed"
    elif backend == "infcl":
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            return "inf-cl not installed (pip package inf-cl)"
        if device != "cuda":
            return "Inf-CL needs CUDA (Triton kernels)"
    elif backend != "reference":
        return f"unknown backend {backend!r}"
    if backend in MATERIALIZING:
        est = 6 * spec["N"] * spec["M"] * ELEM_BYTES[spec["dtype"]] / 2**30
        if est > budget_gb:
            return (f"N x M matrices: estimated {est:.1f} GB (6*N*M*{ELEM_BYTES[spec['dtype']]} B) "
                    f"exceeds the memory budget {budget_gb:.1f} GB")
    return None


def run_group(spec, modes, timeout):
    """Run one worker subprocess; return {mode: partial row}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(dict(spec, modes=modes))]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return {m: {"status": "timeout", "reason": f"case exceeded --case-timeout {timeout:.0f} s"}
                for m in modes}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    status = "oom" if proc.returncode in (-9, 137) else "error"
    reason = f"worker exited {proc.returncode}: " + " | ".join(tail)
    return {m: {"status": status, "reason": reason[:500]} for m in modes}


def print_table(rows, file=sys.stdout):
    head = f"{'backend':<18} {'mode':<6} {'N':>7} {'M':>7} {'dtype':<8} {'median ms':>10} " \
           f"{'p20-p80 ms':>19} {'cpu-time ms':>11} {'peak MB':>9} {'TFLOP/s':>8}  status"
    print(head, file=file)
    print("-" * len(head), file=file)
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["backend"], r["reason"]), []).append(r["N"])
            continue
        if r["status"] != "ok":
            print(f"{r['backend']:<18} {r['mode']:<6} {r['N']:>7} {r['M']:>7} {r['dtype']:<8} "
                  f"{'-':>10} {'':>19} {'':>11} {'-':>9} {'-':>8}  {r['status']}: {r['reason']}",
                  file=file)
            continue
        spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}"
        peak = "-" if r["peak_MB"] is None else f"{r['peak_MB']:.1f}"
        cpu_t = r.get("cpu_time_median_ms")
        cpu_t = "-" if cpu_t is None else f"{cpu_t:.2f}"
        print(f"{r['backend']:<18} {r['mode']:<6} {r['N']:>7} {r['M']:>7} {r['dtype']:<8} "
              f"{r['median_ms']:>10.2f} {spread:>19} {cpu_t:>11} {peak:>9} {r['tflops']:>8.4f}  ok",
              file=file)
    for (backend, reason), ns in skipped.items():
        print(f"skipped {backend} at N={sorted(set(ns))}: {reason}", file=file)


def plot(rows, path, title, time_key="median_ms"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get(time_key) is not None]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"fwd": ":", "bwd": "--", "fwdbwd": "-"}
    series = sorted({(r["backend"], r["dtype"]) for r in ok})
    multi_dtype = len({r["dtype"] for r in ok}) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (backend, dtype) in enumerate(series):
        color = colors[i % len(colors)]
        for mode in MODES:
            pts = sorted((r["N"], r[time_key], r["peak_MB"]) for r in ok
                         if r["backend"] == backend and r["dtype"] == dtype and r["mode"] == mode)
            if not pts:
                continue
            label = f"{backend}{' ' + dtype if multi_dtype else ''} {mode}"
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], styles[mode], marker="o",
                      color=color, label=label)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot([p[0] for p in mem], [max(p[1], 0.01) for p in mem], styles[mode],
                          marker="o", color=color, label=label)
    time_label = ("median wall time (ms)" if time_key == "median_ms" else
                  "median process CPU time per call (ms)")
    for ax, ylabel in ((ax_t, time_label), (ax_m, "peak memory above inputs (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N anchors")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_rows(stem, meta, rows):
    """<stem>.json ({"meta", "rows"}) and <stem>.csv (the rows), each replaced atomically."""
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else
                                 " ".join(map(str, r[k])) if isinstance(r[k], list) else r[k])
                             for k in COLUMNS})
    os.replace(stem + ".csv.tmp", stem + ".csv")


def main(argv=None):
    args = parse_args(argv)
    if args._worker is not None:
        worker(json.loads(args._worker))
        return 0

    import torch

    sys.path.insert(0, REPO)
    import rcl_kernels as rk

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    rk_available = rk.available_backends()
    if args.backends:
        backends = split_list(args.backends)
    else:
        fused = [b for b in (("triton", "cuda") if device == "cuda" else ("cpu",))
                 if not rk_available.get(b)]
        baselines = ["reference", "reference_compile"] + (["flash_sdpa"] if device == "cuda" else [])
        backends = fused + baselines + list(PEERS)
    modes = split_list(args.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"--modes: unknown {bad}; expected {MODES}", file=sys.stderr)
        return 2
    dtypes = []
    for name in split_list(args.dtypes):
        if name not in DTYPES:
            print(f"--dtypes: unknown {name!r}", file=sys.stderr)
            return 2
        dtypes.append(DTYPES[name])
    default_sizes = [1024, 2048, 4096, 8192] if device == "cpu" else [8192, 32768, 65536, 131072]
    sizes = [int(s) for s in split_list(args.sizes)] if args.sizes else default_sizes
    repeats = args.repeats or (50 if device == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 2)
    compile_max_n = args.compile_max_n if args.compile_max_n is not None else (
        None if device == "cuda" else 8192)
    if args.mem_budget_gb is not None:
        budget_gb = args.mem_budget_gb
    elif device == "cuda":
        budget_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        budget_gb = 0.5 * _mem_available_gb()

    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else (
        platform.processor() or platform.machine())
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f
                              if ln.startswith("model name")), platform.machine())
    except OSError:
        cpu_model = platform.machine()
    slug = "cpu" if device == "cpu" else device_slug(dev_name)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = git_commit()
    tag = args.tag or args.preset
    meta = {
        "device": slug, "device_name": dev_name if device == "cuda" else cpu_model,
        "torch": torch.__version__, "triton": triton_version, "commit": commit,
        "python": platform.python_version(), "host": platform.node(),
        "cpu_count": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
        "preset": args.preset, "d": args.d, "C": args.C, "repeats": repeats, "warmup": warmup,
        "seed": args.seed, "temperature": TEMPERATURE,
        "mem_budget_gb": round(budget_gb, 2), "compile_max_n": compile_max_n,
        "available_backends": rk_available, "backends": backends,
        "float32_matmul_precision": args.matmul_precision,
        "loadavg_start": loadavg(),
        "code": code_state(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH_", "ATEN_"))},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "notes": ("Each (backend, N, dtype) group runs in a fresh subprocess; modes run in order. "
                  "Inputs: features [N/2, 2, d] (two views, L2-normalized), labels uniform in "
                  "[0, C), centers [C, d]. loadavg_* are os.getloadavg() before/after each mode: "
                  "the machine may be shared, so CPU timings are noisy when the load exceeds the "
                  "core count. cpu_time_*_ms: process CPU time per call (all threads; "
                  "time.process_time), less sensitive than wall clock to other processes when "
                  "threads=1; with more threads it also counts spin-waiting."),
    }

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{slug}-{tag}")
    rows = []
    for n in sizes:
        for dtype in dtypes:
            for backend in backends:
                m = columns_for(args.preset, backend, n, args.C)
                preset = "supcon" if backend == "pml_supcon" else args.preset
                run_dtype = "bfloat16" if backend == "flash_sdpa" else dtype
                if backend == "flash_sdpa" and dtype != dtypes[0]:
                    continue  # one bf16 proxy row set per size
                spec = {"backend": backend, "preset": preset, "N": n, "M": m, "d": args.d,
                        "C": args.C, "dtype": run_dtype, "device": device, "seed": args.seed,
                        "repeats": repeats, "warmup": warmup, "threads": args.threads,
                        "matmul_precision": args.matmul_precision}
                reason = _skip_reason(backend, spec, args, torch, rk_available, compile_max_n,
                                      budget_gb)
                if reason is not None:
                    results = {mode: {"status": "skipped", "reason": reason} for mode in modes}
                else:
                    print(f"[bench] {backend} N={n} M={m} d={args.d} {run_dtype} "
                          f"{','.join(modes)} load={loadavg()}", flush=True)
                    results = run_group(spec, modes, args.case_timeout)
                for mode in modes:
                    res = results.get(mode, {"status": "error", "reason": "no result"})
                    flops, formula = flop_count(backend, mode, n, m, args.d)
                    median = res.get("median_ms")
                    rows.append({
                        "backend": backend, "mode": mode, "N": n, "M": m, "d": args.d,
                        "C": args.C, "dtype": run_dtype, "matmul_precision": args.matmul_precision,
                        "median_ms": median,
                        "p20_ms": res.get("p20_ms"), "p80_ms": res.get("p80_ms"),
                        "peak_MB": res.get("peak_MB"),
                        "tflops": flops / (median * 1e-3) / 1e12 if median else None,
                        "device": slug, "torch": torch.__version__, "triton": triton_version,
                        "commit": commit, "preset": preset, "status": res.get("status"),
                        "reason": res.get("reason", ""),
                        "timer": "cuda_events" if device == "cuda" else "perf_counter",
                        "repeats": repeats, "warmup": warmup,
                        "cpu_time_median_ms": res.get("cpu_time_median_ms"),
                        "cpu_time_p20_ms": res.get("cpu_time_p20_ms"),
                        "cpu_time_p80_ms": res.get("cpu_time_p80_ms"),
                        "mem_method": res.get("mem_method", ""), "flops": flops,
                        "flops_formula": formula, "threads": meta["threads"],
                        "first_call_s": res.get("first_call_s"),
                        "loadavg_before": res.get("loadavg_before"),
                        "loadavg_after": res.get("loadavg_after"), "host": meta["host"],
                        "code_hash": res.get("code_hash", meta["code"]["code_hash"]),
                    })
                write_rows(stem, meta, rows)  # after every group: a killed run keeps its rows
    meta["loadavg_end"] = loadavg()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_rows(stem, meta, rows)
    if not args.no_plot:
        plot(rows, stem + ".png",
             f"{args.preset} d={args.d} C={args.C} on {meta['device_name']} "
             f"({meta['threads']} threads), torch {torch.__version__}, commit {commit}, "
             f"load {meta['loadavg_start']}", time_key=args.plot_time)
    print()
    print_table(rows)
    print(f"\nwrote {stem}.json, {stem}.csv" + ("" if args.no_plot else f", {stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
