#!/usr/bin/env python
"""How much a busy neighbour slows each CPU implementation: one process spinning on a core while
the loss runs on all of them (a shared workstation, a data-loader worker).

For every shape and implementation, the forward + backward is timed quiet, then with the spinner
running, then quiet again, in one process (the same inputs, warm caches). A statically split
parallel loop waits for its slowest thread, so a kernel can lose more than the core it shares;
the slowdown (busy / quiet median) of the fused path should not exceed the reference's.

  python bench/busy_neighbour.py --shapes 4096:128:1000 512:1024:1000 --tag busy-neighbour
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import cases
import runner

SPIN = "while True: pass"


def timed(case, rep_ms: float) -> dict:
    fn = case.timed("fwdbwd")
    return runner.measure_time(fn, cuda=False, rep_ms=rep_ms, warmup_ms=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["4096:128:1000", "512:1024:1000"],
                   metavar="N:d:C")
    p.add_argument("--backends", nargs="+", default=["reference", "cpu:tiled", "auto"])
    p.add_argument("--rep-ms", type=float, default=2000.0, help="timing per phase (ms)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(runner.REPO, "bench", "results"))
    p.add_argument("--tag", default="busy-neighbour")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = cases.parse_shapes(args.shapes)
        impls = [cases.parse_impl(s) for s in cases.split_list(args.backends)]
    except ValueError as error:
        sys.exit(str(error))

    meta = {"cpu_model": runner.cpu_model(), "torch": torch.__version__,
            "commit": runner.git_commit(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "neighbour": f"{sys.executable} -c '{SPIN}'",
            "rep_ms": args.rep_ms, "loadavg_start": runner.loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": args.__dict__}
    rows = []
    for n, d, c in shapes:
        for impl in impls:
            case = cases.build(impl, "bcl", n, d, c, "float32", "cpu")
            for _ in range(2):  # warm-up: first-touch allocations, auto's timing
                case.backward(case.forward())
            quiet = timed(case, args.rep_ms)
            spinner = subprocess.Popen([sys.executable, "-c", SPIN])
            try:
                time.sleep(0.2)  # let it reach a core
                busy = timed(case, args.rep_ms)
            finally:
                spinner.kill()
                spinner.wait()
            quiet_again = timed(case, args.rep_ms)
            quiet_ms = min(quiet["median_ms"], quiet_again["median_ms"])
            row = {"impl": impl.label, "N": n, "M": cases.columns_for("bcl", impl.backend, n, c),
                   "d": d, "C": c, "quiet_ms": round(quiet_ms, 3),
                   "quiet_runs_ms": [round(quiet["median_ms"], 3), round(quiet_again["median_ms"], 3)],
                   "busy_ms": round(busy["median_ms"], 3),
                   "slowdown": round(busy["median_ms"] / quiet_ms, 3)}
            rows.append(row)
            print(f"[busy-neighbour] {row}", flush=True)
    meta["loadavg_end"] = runner.loadavg()
    path = runner.write_json(os.path.join(args.out, f"cpu-{args.tag}.json"), meta, rows)
    print("\n| N | M | d | implementation | quiet ms | busy ms | slowdown |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['M']} | {r['d']} | {r['impl']} | {r['quiet_ms']:.1f} | "
              f"{r['busy_ms']:.1f} | {r['slowdown']:.2f}x |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
