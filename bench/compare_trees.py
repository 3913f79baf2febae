"""Two builds of rcl_kernels on the same CPU, same calls: is one slower than the other?

Each tree is a source checkout with its extension built in place (`python setup.py build_ext
--inplace`), e.g. a `git worktree` of an older commit. The trees take turns: one subprocess per
tree per turn, so that a slow spell of a shared machine falls on both alike. In each subprocess
the implementations are timed in interleaved rounds (forward + backward of the BCL preset, float32,
this file's bench/cases.py for the inputs, the public API only), and each turn's minimum and median
per implementation and shape are kept. The row of a (tree, implementation, shape) is the minimum
and the median over its turns' minima.

  python bench/compare_trees.py --trees /path/to/old /path/to/new --turns 3 --tag layout

An editable install of rcl_kernels in the interpreter's environment is bypassed: each subprocess
imports the package from its tree, and refuses to run if it did not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import runner

HERE = os.path.dirname(os.path.abspath(__file__))

# The subprocess: import rcl_kernels from the tree, time the implementations, print one JSON line.
CHILD = r"""
import json, os, statistics, sys, time
tree, bench, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# An editable install puts a finder ahead of sys.path: drop it, so the tree's package is imported.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:0] = [tree, bench]
import cases
import rcl_kernels as rk
if not os.path.abspath(rk.__file__).startswith(os.path.abspath(tree) + os.sep):
    sys.exit(f"rcl_kernels came from {rk.__file__}, not from {tree}")
out = {}
for n, d in spec["shapes"]:
    calls = {}
    for label in spec["impls"]:
        if label == "reference" and n > spec["reference_max_n"]:
            continue
        case = cases.build(cases.parse_impl(label), "bcl", n, d, spec["C"], "float32", "cpu")
        calls[label] = case.timed("fwdbwd")
        calls[label]()  # warm-up
    times = {label: [] for label in calls}
    for _ in range(spec["rounds"]):
        for label, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - start) * 1e3)
    for label, t in times.items():
        out[f"{n}:{d}:{label}"] = [min(t), statistics.median(t)]
print(json.dumps(out))
"""


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:d (e.g. 512:1024), got {text!r}") from None
    if n < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"N and d must be positive, got {text!r}")
    return n, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    p.add_argument("--shapes", nargs="+", type=parse_shape,
                   default=[(256, 128), (512, 1024), (4096, 128)])
    p.add_argument("--impls", nargs="+", default=["cpu:tiled", "cpu:streaming", "reference"])
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--reference-max-n", type=int, default=1024,
                   help="the reference (N x M matrices, slow) only up to this N")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--out", default=os.path.join(runner.REPO, "bench", "results"))
    p.add_argument("--tag", default="compare-trees")
    args = p.parse_args(argv)
    for tree in args.trees:
        if not os.path.isfile(os.path.join(tree, "rcl_kernels", "__init__.py")):
            sys.exit(f"--trees: {tree} holds no rcl_kernels/ package")
    spec = {"shapes": args.shapes, "impls": args.impls, "C": args.C, "rounds": args.rounds,
            "reference_max_n": args.reference_max_n}
    turns = {tree: [] for tree in args.trees}
    for turn in range(args.turns):
        for tree in args.trees:
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, tree, HERE, json.dumps(spec)],
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                sys.exit(f"{tree}: turn {turn + 1} ran past --timeout {args.timeout:g} s")
            if done.returncode != 0:
                sys.exit(f"{tree}: turn {turn + 1} failed:\n{done.stderr[-2000:]}")
            turns[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[compare-trees] turn {turn + 1}: {tree} done", flush=True)

    rows = []
    for key in turns[args.trees[0]][0]:
        n, d, label = key.split(":", 2)
        row = {"N": int(n), "d": int(d), "impl": label}
        for name, tree in zip(("before", "after"), args.trees):
            minima = [t[key][0] for t in turns[tree] if key in t]
            row[f"{name}_min_ms"] = round(min(minima), 3)
            row[f"{name}_median_ms"] = round(statistics.median(minima), 3)
        row["after_over_before_min"] = round(row["after_min_ms"] / row["before_min_ms"], 3)
        row["after_over_before_median"] = round(row["after_median_ms"] / row["before_median_ms"], 3)
        rows.append(row)
    meta = {"cpu_model": runner.cpu_model(), "trees": args.trees,
            "commits": [runner.git_commit(tree) for tree in args.trees], "argv": vars(args),
            "threads": os.cpu_count(), "loadavg_end": runner.loadavg(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print("| N | d | impl | before min | after min | after/before (min) | (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['d']} | {r['impl']} | {r['before_min_ms']:.1f} | "
              f"{r['after_min_ms']:.1f} | {r['after_over_before_min']:.2f} | "
              f"{r['after_over_before_median']:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    path = runner.write_json(os.path.join(args.out, f"cpu-{args.tag}.json"), meta, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
