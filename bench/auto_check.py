#!/usr/bin/env python
"""Is `auto`, after its tuning, as fast as the fastest candidate? Per shape, in one process.

For every shape of the grid, `auto` and each candidate run forward + backward of the BCL loss on
the same inputs, in interleaved rounds (auto, then each candidate, then again), so that a drift of
the machine's speed (a shared VM, a neighbour) hits them alike; times are the median over rounds.
A candidate whose first round is over --drop times the best first round is timed once: it cannot
be the fastest. The first call of `auto` tunes (its cost is reported) with a fresh cache. With
gemm_floor among the candidates, every time is also given as a multiple of those three GEMMs.

  python bench/auto_check.py --sizes 256 512 1024 2048 4096 8192 16384 --d 128 1024 --tag auto-check
  python bench/auto_check.py --sizes 512 4096 --d 128 1024 --candidates cpu:tiled gemm_floor reference --tag gemm-floor-check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cases
import runner


def tuned_choice(cache_dir: str, n: int, m: int, d: int) -> str | None:
    """The candidate auto's tuning stored for this shape (a mean with gradients), read from its
    on-disk cache (rcl_kernels/autotune.py documents the format)."""
    for name in os.listdir(cache_dir):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(cache_dir, name)) as f:
            choices = json.load(f).get("choices", {})
        for entries in choices.values():
            for key, entry in entries.items():
                if entry.get("shape") == [n, m, d] and "|mean|grad=1|" in key:
                    return entry["candidate"]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--d", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--candidates", nargs="+", default=["cpu:tiled", "cpu:streaming", "reference"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="fewer rounds (at least 3) where the rounds would take longer than this")
    p.add_argument("--drop", type=float, default=1.5)
    p.add_argument("--out", default=os.path.join(runner.REPO, "bench", "results"))
    p.add_argument("--tag", default="auto-check")
    args = p.parse_args(argv)

    # A fresh tuning cache: auto's first call of each shape tunes here, as on a new machine.
    os.environ.setdefault("RCL_KERNELS_CACHE_DIR", tempfile.mkdtemp(prefix="rcl-auto-check-"))
    import torch

    import rcl_kernels as rk

    try:
        candidates = [cases.parse_impl(s) for s in cases.split_list(args.candidates)]
    except ValueError as error:
        sys.exit(str(error))
    meta = {"cpu_model": runner.cpu_model(), "torch": torch.__version__, "rcl_kernels": rk.__version__,
            "commit": runner.git_commit(), "threads": torch.get_num_threads(),
            "cache_dir": os.environ["RCL_KERNELS_CACHE_DIR"], "argv": vars(args),
            "loadavg_start": runner.loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = []
    for d in args.d:
        for n in args.sizes:
            impls = [cases.Impl("auto")] + candidates
            calls = {}
            first_call_s = None
            for impl in impls:
                case = cases.build(impl, "bcl", n, d, args.C, "float32", "cpu")
                fn = case.timed("fwdbwd")
                start = time.perf_counter()
                fn()  # auto: tunes this shape's key
                if impl.backend == "auto":
                    first_call_s = time.perf_counter() - start
                calls[impl.label] = fn
            m = cases.columns_for("bcl", "cpu", n, args.C)
            chosen = tuned_choice(os.environ["RCL_KERNELS_CACHE_DIR"], n, m, d)
            times = {label: [] for label in calls}
            dropped = set()
            rounds = args.rounds
            for r in range(rounds):
                for label, fn in calls.items():
                    if label in dropped:
                        continue
                    start = time.perf_counter()
                    fn()
                    times[label].append((time.perf_counter() - start) * 1e3)
                if r == 0:
                    best = min(v[0] for label, v in times.items() if label != "gemm_floor")
                    dropped = {label for label, v in times.items()
                               if label not in ("auto", "gemm_floor") and v[0] > args.drop * best}
                    per_round_s = sum(v[0] for label, v in times.items() if label not in dropped) / 1e3
                    rounds = max(3, min(args.rounds, int(args.budget_s / max(per_round_s, 1e-9))))
                if r + 1 >= rounds:
                    break
            medians = {label: statistics.median(v) for label, v in times.items()}
            # The fastest loss implementation; gemm_floor (three bare GEMMs, not a loss) is the
            # floor the others are compared with.
            fastest = min((label for label in medians if label not in ("auto", "gemm_floor")),
                          key=medians.get)
            row = {"N": n, "M": m, "d": d, "C": args.C, "auto_chose": chosen,
                   "auto_first_call_s": round(first_call_s, 3),
                   "median_ms": {label: round(v, 3) for label, v in medians.items()},
                   "samples": {label: len(v) for label, v in times.items()},
                   "fastest": fastest, "auto_vs_fastest": round(medians["auto"] / medians[fastest], 3),
                   "loadavg": runner.loadavg()}
            if "gemm_floor" in medians:
                row["vs_gemm_floor"] = {label: round(v / medians["gemm_floor"], 3)
                                        for label, v in medians.items()}
            rows.append(row)
            print(f"[auto-check] {row}", flush=True)
    meta["loadavg_end"] = runner.loadavg()
    path = runner.write_json(os.path.join(args.out, f"cpu-{args.tag}.json"), meta, rows)
    labels = ["auto"] + [c.label for c in candidates]
    print("\n| N | d | " + " | ".join(f"{label} ms" for label in labels)
          + " | auto chose | auto / fastest |")
    print("|---" * (len(labels) + 4) + "|")
    for r in rows:
        print(f"| {r['N']} | {r['d']} | "
              + " | ".join(f"{r['median_ms'][label]:.1f}" for label in labels)
              + f" | {r['auto_chose']} | {r['auto_vs_fastest']:.2f}x |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
