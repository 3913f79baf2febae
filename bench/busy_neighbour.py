#!/usr/bin/env python
"""How much a busy neighbour slows each CPU implementation: one process spinning on a core while
the loss runs on all of them (a shared workstation, a data-loader worker).

For every shape, in one process (the same inputs, warm caches), rounds of: every implementation
timed quiet, then every implementation timed with the spinner running. All implementations of a
round share the same neighbour, and the rounds spread the machine's own noise over them; an
implementation's slowdown is the median of its busy times over the median of its quiet ones. A
statically split parallel loop waits for its slowest thread, so a kernel can lose more than the
core it shares; the slowdown of the fused path should not exceed the reference's.

  python bench/busy_neighbour.py --shapes 4096:128:1000 512:1024:1000 --tag busy-neighbour
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    p.add_argument("--rep-ms", type=float, default=1000.0,
                   help="timing of one implementation in one phase (ms)")
    p.add_argument("--rounds", type=int, default=3, help="quiet/busy rounds per shape")
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
            "rep_ms": args.rep_ms, "rounds": args.rounds, "loadavg_start": runner.loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": args.__dict__}
    rows = []
    for n, d, c in shapes:
        built = [(impl, cases.build(impl, "bcl", n, d, c, "float32", "cpu")) for impl in impls]
        for _, case in built:
            for _ in range(2):  # warm-up: first-touch allocations, auto's timing
                case.backward(case.forward())
        times = {impl.label: {"quiet": [], "busy": []} for impl, _ in built}
        for _ in range(args.rounds):
            for impl, case in built:
                times[impl.label]["quiet"].append(timed(case, args.rep_ms)["median_ms"])
            spinner = subprocess.Popen([sys.executable, "-c", SPIN])
            try:
                time.sleep(0.2)  # let it reach a core
                for impl, case in built:
                    times[impl.label]["busy"].append(timed(case, args.rep_ms)["median_ms"])
            finally:
                spinner.kill()
                spinner.wait()
        for impl, _ in built:
            quiet, busy = times[impl.label]["quiet"], times[impl.label]["busy"]
            row = {"impl": impl.label, "N": n, "M": cases.columns_for("bcl", impl.backend, n, c),
                   "d": d, "C": c, "quiet_ms": round(statistics.median(quiet), 3),
                   "busy_ms": round(statistics.median(busy), 3),
                   "quiet_rounds_ms": [round(t, 3) for t in quiet],
                   "busy_rounds_ms": [round(t, 3) for t in busy]}
            row["slowdown"] = round(row["busy_ms"] / row["quiet_ms"], 3)
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
