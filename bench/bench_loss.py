#!/usr/bin/env python
"""Speed and peak memory of the contrastive loss per implementation, with baselines (DESIGN §5).

Times forward ("fwd"), backward ("bwd") and forward+backward ("fwdbwd") of one preset (bcl by
default) for each implementation (bench/cases.py: `backend[:algorithm][{NAME=value,...}]`, e.g.
cpu, cpu:tiled, cuda:streaming, triton{RCL_KERNELS_TRITON_VARIANT=one-pass}, reference,
reference_compile, flash_sdpa, pml_supcon, infcl) over a grid of sizes, with the baselines in the
same run. How it times and measures memory, and how cases are isolated: bench/runner.py.

Writes <out>/<device>-<tag>.json ({"meta", "rows"}), .csv (the rows) and .png (time and memory
against N; grouped bars per implementation and mode for a single N), and prints a markdown table:
per shape, mode and implementation the median and p20-p80 ms, TFLOP/s, the speed-up against the
eager reference and the peak MB. Rows are long-format: backend, mode, N,
M, d, C, dtype, median_ms, p20_ms, p80_ms, peak_MB, tflops, device, torch, triton, commit, plus
impl, algorithm, env, preset, status (ok, skipped, error, oom, timeout, not_run), reason, lscpu's
cpu_model, threads, timer, ... A case that is skipped, fails, runs out of memory or times out is
a row with its reason, never the end of the run.

Examples:
  # CPU, N = 4,096: the fused op against the reference, eager and compiled
  python bench/bench_loss.py --device cpu --sizes 4096 --backends cpu,reference,reference_compile
  # crossover of the algorithms at fixed d, C and dtype (time against N, one line each)
  python bench/bench_loss.py --device cuda --sizes 256 512 1024 2048 4096 8192 16384 \\
      --d 128 1024 --dtypes bf16 --modes fwdbwd --backends cuda:streaming,cuda:tiled \\
      --plot crossover
  # table and plot again from saved rows
  python bench/bench_loss.py --report bench/results/h100-crossover.json --plot crossover
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time

import cases
import runner

DTYPES = {"float32": "float32", "fp32": "float32", "tf32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "float64": "float64",
          "fp64": "float64"}


def parse_args(argv=None):
    doc = __doc__.split("\n", 1)
    p = argparse.ArgumentParser(description=doc[0], epilog=doc[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--backends", nargs="+", default=None, metavar="IMPL",
                   help="implementations, comma/space separated (see above); default cpu: cpu, "
                        "reference, reference_compile; cuda: triton, cuda, reference, "
                        "reference_compile, flash_sdpa; both: the peers")
    p.add_argument("--sizes", nargs="+", default=None, metavar="N",
                   help="anchors N; default cpu: 1024 2048 4096 8192, cuda: 8192 32768 65536 "
                        "131072")
    p.add_argument("--d", nargs="+", type=int, default=[128], help="feature dims (default 128)")
    p.add_argument("--C", nargs="+", type=int, default=[1000], help="classes (default 1000)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="N:d:C",
                   help="explicit (N, d, C) triples instead of the grid --sizes x --d x --C")
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   help="float32/fp32, tf32 (float32 under matmul precision 'high'), "
                        "bfloat16/bf16, float16/fp16, float64/fp64")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                   help="torch.set_float32_matmul_precision for float32 (fp32) cases")
    p.add_argument("--modes", nargs="+", default=["fwd,bwd,fwdbwd"])
    p.add_argument("--preset", choices=cases.PRESETS, default="bcl")
    p.add_argument("--env", action="append", default=[], metavar="NAME=value",
                   help="environment variable of every case (repeatable); a case's own {...} "
                        "wins")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before memory and timing (compile, autotune); default 2")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="timing per case and mode: do_bench's rep on a GPU, blocked_autorange's "
                        "min_run_time on the CPU; default cuda 200, cpu 1000")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench's warmup (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--imbalance", type=float, default=100.0,
                   help="label imbalance rho of the long-tailed draw (1: uniform); default 100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip N x M baselines whose estimate 6*N*M*bytes exceeds this; default "
                        "90%% of GPU memory, or 50%% of MemAvailable on the CPU")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--isolation", choices=("case", "env"), default="case",
                   help="a subprocess per case (default), or per environment, restarted after "
                        "a crash (faster where each start costs seconds)")
    p.add_argument("--out", default=os.path.join(runner.REPO, "bench", "results"))
    p.add_argument("--tag", default=None, help="file name <device>-<tag>; default the preset")
    p.add_argument("--plot", choices=("time", "crossover", "none"), default="time",
                   help="time: time and memory against N; crossover: time against N per "
                        "implementation, one panel per (d, C, dtype)")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print the table of saved rows and plot them (with --plot, "
                        "into --out as <device>-<tag>.png)")
    return p.parse_args(argv)


def grid(args, device):
    """[(N, d, C)] from --shapes, or --sizes x --d x --C."""
    if args.shapes:
        try:
            return cases.parse_shapes(args.shapes)
        except ValueError as error:
            sys.exit(str(error))
    default = [1024, 2048, 4096, 8192] if device == "cpu" else [8192, 32768, 65536, 131072]
    sizes = [int(s) for s in cases.split_list(args.sizes)] if args.sizes else default
    return [(n, d, c) for n in sizes for d in args.d for c in args.C]


def report(args) -> int:
    import json

    rows, metas = [], []
    for path in args.report:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        metas.append(data["meta"])
    print(runner.table(rows))
    if args.plot != "none":
        meta = metas[0]
        stem = os.path.join(args.out, f"{meta['device']}-{args.tag or 'report'}")
        runner.plot(rows, stem + ".png", f"{meta['device_name']}, commit(s) "
                    f"{sorted({m['commit'] for m in metas})}", args.plot)
        print(f"wrote {stem}.png")
    return 0


def plan(args, device, argv):
    """(meta, specs): what the run records about itself, and one spec per case (a spec with a
    "skip" entry is not run)."""
    import torch

    import rcl_kernels as rk

    try:
        default = (["cpu", "reference", "reference_compile"] if device == "cpu" else
                   ["triton", "cuda", "reference", "reference_compile", "flash_sdpa"])
        impls = [cases.parse_impl(s) for s in cases.split_list(args.backends or
                                                               default + list(cases.PEERS))]
        run_env = cases.parse_env(args.env)
    except ValueError as error:
        sys.exit(str(error))
    modes = cases.split_list(args.modes)
    if any(m not in cases.MODES for m in modes):
        sys.exit(f"--modes: expected some of {cases.MODES}, got {modes}")
    dtypes = cases.split_list(args.dtypes)
    if any(name not in DTYPES for name in dtypes):
        sys.exit(f"--dtypes: expected some of {sorted(DTYPES)}, got {dtypes}")
    rep_ms = args.rep_ms or (200.0 if device == "cuda" else 1000.0)
    if args.mem_budget_gb is not None:
        budget_gb = args.mem_budget_gb
    elif device == "cuda":
        budget_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        budget_gb = 0.5 * runner.mem_available_gb()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    available = rk.available_backends()
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else runner.cpu_model()
    meta = {
        "device": "cpu" if device == "cpu" else runner.device_slug(device_name),
        "device_name": device_name, "cpu_model": runner.cpu_model(), "torch": torch.__version__,
        "triton": triton_version, "commit": runner.git_commit(), "host": platform.node(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(), "preset": args.preset,
        "imbalance": args.imbalance, "seed": args.seed, "warmup": args.warmup, "rep_ms": rep_ms,
        "warmup_ms": args.warmup_ms, "isolation": args.isolation,
        "mem_budget_gb": round(budget_gb, 2), "available_backends": available,
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH_", "ATEN_", "RCL_KERNELS_"))},
        "loadavg_start": runner.loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    specs = []
    for n, d, c in grid(args, device):
        for dtype_name in dtypes:
            for impl in impls:
                if impl.backend == "flash_sdpa" and any(
                        (s["impl"], s["N"], s["d"], s["C"]) == (impl.label, n, d, c)
                        for s in specs):
                    continue  # one bf16 proxy per shape, whatever the dtypes
                m = cases.columns_for(args.preset, impl.backend, n, c)
                dtype = "bfloat16" if impl.backend == "flash_sdpa" else DTYPES[dtype_name]
                spec = {"id": len(specs), "impl": impl.label, "env": list(run_env + impl.env),
                        "preset": "supcon" if impl.backend == "pml_supcon" else args.preset,
                        "N": n, "M": m, "d": d, "C": c, "dtype": dtype,
                        "matmul_precision": "high" if dtype_name == "tf32" else
                        args.matmul_precision, "device": device, "seed": args.seed,
                        "imbalance": args.imbalance, "threads": args.threads, "modes": modes,
                        "warmup": args.warmup, "rep_ms": rep_ms, "warmup_ms": args.warmup_ms}
                reason = cases.skip_reason(impl, device, n, m, dtype, budget_gb, available)
                if reason is not None:
                    spec["skip"] = {"status": "skipped", "reason": reason}
                specs.append(spec)
    return meta, specs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    meta, specs = plan(args, device, argv)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{meta['device']}-{args.tag or args.preset}")
    to_run = [s for s in specs if "skip" not in s]
    print(f"[bench] {len(to_run)} cases to run, {len(specs) - len(to_run)} skipped; rows in "
          f"{stem}.json", flush=True)
    reported = [0]

    def progress(results):  # rows on disk as they come: a killed run keeps what it measured
        runner.write_rows(stem, meta, runner.make_rows(specs, results, meta))
        done = sum(len(results.get(s["id"], {})) == len(s["modes"]) for s in to_run)
        if done > reported[0]:
            reported[0] = done
            print(f"[bench] {done}/{len(to_run)} cases done, load {runner.loadavg()}", flush=True)

    # On SIGTERM (a step's timeout) unwind, so the running worker is killed, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = runner.run_cases(to_run, args.isolation, args.case_timeout, dict(os.environ),
                               progress)
    meta.update(loadavg_end=runner.loadavg(),
                finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    rows = runner.make_rows(specs, results, meta)
    runner.write_rows(stem, meta, rows)
    if args.plot != "none":
        runner.plot(rows, stem + ".png",
                    f"{args.preset} on {meta['device_name']} ({meta['threads']} threads), torch "
                    f"{meta['torch']}, commit {meta['commit']}", args.plot)
    print()
    print(runner.table(rows))
    print(f"\nwrote {stem}.json, {stem}.csv" + ("" if args.plot == "none" else f", {stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
