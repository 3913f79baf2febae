#!/usr/bin/env python
"""Fixed costs of one loss call at small shapes: aten ops and time of forward + backward, eager and
under torch.compile (inductor, fullgraph), one thread, RCL preset with a tail margin, `cpu`
backend. Used to choose how the fused loss is wrapped: an outer custom op hides the
O((N + M)·d) glue from Inductor, an autograd.Function over the kernel ops does not.

    python bench/layer_overhead.py [--algorithm streaming|tiled]

Prints one JSON line per shape; the time is the 20th percentile of 30 calls (robust to a shared
machine).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import rcl_kernels as rk
import runner


def inputs(batch, dim, classes):
    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(batch, 2, dim, generator=gen), dim=-1)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    return features, labels, centers


def run(step, features, centers):
    f, c = features.clone().requires_grad_(), centers.clone().requires_grad_()
    step(f, c).backward()


def aten_ops(step, features, centers):
    with torch.profiler.profile() as prof:
        run(step, features, centers)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def p20_ms(step, features, centers, calls=30):
    for _ in range(5):
        run(step, features, centers)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(step, features, centers)
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[calls // 5], 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for batch, dim, classes in ((8, 16, 4), (256, 128, 100)):
        features, labels, centers = inputs(batch, dim, classes)
        counts = torch.arange(classes, 0, -1) * 10

        # algorithm= only when given, so that commits from before it existed can be measured.
        options = {} if args.algorithm == "auto" else {"algorithm": args.algorithm}

        def step(f, c):
            return rk.rcl_loss(f, labels, c, counts, tail_margin=0.1, backend="cpu", **options)

        compiled = torch.compile(step, fullgraph=True)
        run(compiled, features, centers)
        print(json.dumps({
            "N": 2 * batch, "d": dim, "C": classes, "algorithm": args.algorithm,
            "eager_aten_ops": aten_ops(step, features, centers),
            "eager_ms_p20": p20_ms(step, features, centers),
            "inductor_ms_p20": p20_ms(compiled, features, centers),
            "cpu_model": runner.cpu_model(),
            "torch": torch.__version__,
        }))


if __name__ == "__main__":
    main()
