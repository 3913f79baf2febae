"""pytest-benchmark suite of the timing cases (bench/cases.py), for regression tracking.

  pytest bench/ --benchmark-only --benchmark-compare      # against the latest saved run
  pytest bench/ --benchmark-only --benchmark-save=NAME    # save a run to compare against later

`make bench` runs it with the saved runs kept in bench/results/pytest-benchmark. The CPU cases run
anywhere; the GPU cases where a CUDA device is present (skipped otherwise). Not part of
`make test`: pytest's testpaths is tests/. Memory, baselines across sizes and plots are the
standalone runner's (bench/bench_loss.py). Each test times one call per round with pytest's
wall clock (the GPU cases synchronize inside the timed call), after untimed warm-up rounds that
compile and autotune.
"""

from __future__ import annotations

import pytest
import torch

import cases
import rcl_kernels as rk

# (implementations, N, d, C, dtype): on the CPU N = 4,096 (docs/benchmarks.md's run) and a small one; on a
# GPU, BCL's training shapes and the large-batch ones.
CPU = [(("cpu", "cpu:tiled", "reference", "reference_compile"), n, 128, 1000, "float32")
       for n in (1024, 4096)]
GPU_FUSED = ("triton", "cuda", "cuda:streaming", "cuda:tiled", "auto")
GPU = [
    (GPU_FUSED + ("reference", "reference_compile"), 512, 1024, 1000, "float32"),
    (GPU_FUSED + ("reference", "reference_compile"), 512, 1024, 1000, "bfloat16"),
    (GPU_FUSED + ("reference", "reference_compile", "flash_sdpa"), 8192, 128, 1000, "bfloat16"),
    (GPU_FUSED + ("flash_sdpa",), 32768, 128, 1000, "bfloat16"),
]


def _params(table, device):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return [pytest.param(impl, n, d, c, dtype, mode, device, marks=marks,
                         id=f"{impl}-N{n}-d{d}-C{c}-{dtype}-{mode}")
            for impls, n, d, c, dtype in table for impl in impls for mode in cases.MODES]


@pytest.mark.parametrize("impl, n, d, c, dtype, mode, device",
                         _params(CPU, "cpu") + _params(GPU, "cuda"))
def test_speed(benchmark, impl, n, d, c, dtype, mode, device):
    parsed = cases.parse_impl(impl)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m = cases.columns_for("bcl", parsed.backend, n, c)
    budget_gb = 0.5 * (torch.cuda.get_device_properties(0).total_memory / 2**30
                       if device == "cuda" else 8)
    reason = cases.skip_reason(parsed, device, n, m, dtype, budget_gb, rk.available_backends())
    if reason:
        pytest.skip(reason)
    torch.compiler.reset()  # reference_compile compiles in this test's warm-up, not before
    case = cases.build(parsed, "bcl", n, d, c, dtype, device)
    try:  # the first call; an API without this algorithm refuses it naming the argument
        fn = case.timed(mode)
        fn()
    except (TypeError, ValueError) as error:
        if parsed.algorithm and "algorithm" in str(error):
            pytest.skip(f"{impl}: {error}")
        raise
    if device == "cuda":
        call = fn

        def fn():
            call()
            torch.cuda.synchronize()

    flops, formula = cases.flop_count(parsed.backend, mode, n, m, d)
    benchmark.group = f"bcl N={n} d={d} C={c} {dtype} {mode}"
    benchmark.extra_info.update(impl=impl, N=n, M=m, d=d, C=c, dtype=dtype, mode=mode,
                                flops=flops, flops_formula=formula,
                                threads=torch.get_num_threads())
    rounds = 20 if device == "cuda" else 5
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
