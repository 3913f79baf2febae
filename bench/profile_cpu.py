#!/usr/bin/env python
"""Where the time of the `cpu` backend goes: torch.profiler over forward and backward.

The fused op calls ATen from C++ inside its tiles, so the profiler sees the GEMMs (aten::mm for
the logit tiles, aten::addmm_ for the gradient products) and the vectorized exp (aten::exp_);
the scalar loops of the kernel (bias/mask, row max and shift, row sums, weight scaling) are not
ATen ops and show up as the self time of rcl_kernels::streaming_lse_*. The positive terms and
bias tables (segment sums, index_add, gathers) are ATen ops outside the custom op.

Also times the pieces alone for scale: one N x M GEMM and one exp over N x M floats.

  python bench/profile_cpu.py --N 4096 --C 1000 --d 128 --threads 1 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.benchmark import Timer

import cases
import runner


def categorize(name):
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::bmm"):
        return "gemm"
    if name in ("aten::exp", "aten::exp_"):
        return "exp"
    if name.startswith("rcl_kernels::"):
        return "kernel scalar loops (bias/mask, max/shift, row sums, scaling)"
    if name in ("aten::index_add", "aten::index_add_", "aten::index", "aten::index_select",
                "aten::sum", "aten::mul", "aten::sub", "aten::div", "aten::where",
                "aten::index_put_", "aten::scatter_add_", "aten::embedding_dense_backward"):
        return "positive term / tables (segment sums, gathers, elementwise O(N d))"
    return "other"


def profile_phase(fn, threads):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    buckets, ops = {}, {}
    for evt in prof.key_averages():
        self_ms = evt.self_cpu_time_total / 1e3
        if self_ms <= 0:
            continue
        cat = categorize(evt.key)
        buckets[cat] = buckets.get(cat, 0.0) + self_ms
        ops[evt.key] = {"self_ms": self_ms, "calls": evt.count, "category": cat}
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])[:15])
    return {"wall_ms": wall, "threads": threads, "self_ms_by_category": buckets, "top_ops": top}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for cpu-profile-N<N>-t<threads>.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, c, d = args.N, args.C, args.d
    m = cases.columns_for("bcl", "cpu", n, c)
    case = cases.build(cases.Impl("cpu"), "bcl", n, d, c, "float32", "cpu")
    for _ in range(2):  # warm-up
        case.backward(case.forward())
    result = {"N": n, "M": m, "d": d, "C": c, "threads": args.threads,
              "cpu_model": runner.cpu_model(), "torch": torch.__version__,
              "commit": runner.git_commit(), "loadavg_before": os.getloadavg()}
    result["forward"] = profile_phase(case.forward, args.threads)
    loss = case.forward()
    result["backward"] = profile_phase(lambda: case.backward(loss), args.threads)

    # The pieces alone, same thread count.
    feats, centers = case.leaves
    z = feats.detach().transpose(0, 1).reshape(n, d)
    k = torch.cat([z, centers.detach()])
    out = torch.empty(n, m)

    def median_ms(fn):
        return Timer(stmt="fn()", globals={"fn": fn}, num_threads=args.threads
                     ).blocked_autorange(min_run_time=0.5).median * 1e3

    gemm = median_ms(lambda: torch.mm(z, k.t(), out=out))
    result["alone"] = {
        "gemm_NxM_ms": gemm, "gemm_GFLOPs": 2 * n * m * d / gemm / 1e6,
        "exp_NxM_ms": median_ms(lambda: out.exp_().clamp_(max=1.0)),
        "timer": "torch.utils.benchmark.Timer.blocked_autorange, median",
        "note": "one N x M GEMM (2NMd flops) and one exp over N*M floats",
    }
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"cpu-profile-N{n}-t{args.threads}.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
