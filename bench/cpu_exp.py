"""The CPU epilogue's exponential against ATen's: is `Vectorized<T>::exp()` (Sleef, 1 ulp) or
`Vectorized<float>::exp_u20()` faster than the product's hand-written `exp_shifted`
(csrc/cpu/vec_exp.h), at like accuracy?

Each implementation runs the epilogue's exponential pass, out = exp(x − shift[row]) in place plus
the row sums, over a block of rows (BCL's 128 × 1,512; 128 × 5,096) whose logits are
scale 10 × cosine minus the row max, on one thread, from cache: each timed pass first gets a fresh
copy of the block (untimed). bench/cpu_exp.cpp is compiled twice with
torch.utils.cpp_extension.load, for AVX-512 and for AVX2 + FMA with ATen's CPU_CAPABILITY macros,
so at::vec takes the width it takes in ATen's own kernels of that ISA; at::exp_ on the shifted
tensor (what PyTorch runs) is the baseline. The implementations are interleaved round robin in one
process, so a slow spell of this shared machine falls on all of them alike; the table has the min
and the median over every timed pass.

Accuracy, against long double exp of the same argument (the subtraction is in the dtype, the same
for all): the max relative error and the max error in ulps over the timed block and over a sweep
(float: [-88, 0], double: [-708, 0]; a uniform grid plus random bit patterns, which reach the tiny
arguments near 0). Only results at or above the product's flush point (e^-80 for float, e^-600 for
double) count; `flushes` says whether an implementation gives 0 below it, as the product must
(its probabilities feed GEMMs, where a denormal operand is very slow).

    python bench/cpu_exp.py                        # both ISAs, writes bench/results/cpu-exp.json
    python bench/cpu_exp.py --isa avx2 --rounds 3 --out /tmp/x.json

The build goes to build/cpu_exp/<isa> (git-ignored) and needs no network. A CPU without an
ISA's features is refused with a message naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import runner  # noqa: E402  (cpu_model, git_commit)

# The flags of ATen's own builds of each capability (cmake/Codegen.cmake), and the CPU features
# they need.
ISAS = {
    "avx512": (["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                "-mavx512vl", "-mavx512dq", "-mfma"],
               ["avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"]),
    "avx2": (["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
             ["avx2", "fma"]),
}
# Variant numbers of bench/cpu_exp.cpp.
HAND, SLEEF, SLEEF_FLUSH, U20, U20_FLUSH, ATEN = 0, 1, 2, 3, 4, 5
CUTOFF = {torch.float32: -80.0, torch.float64: -600.0}  # ExpTraits<T>::kCutoff
SWEEP = {torch.float32: (-88.0, 0.0), torch.float64: (-708.0, 0.0)}  # down to the smallest normal
MAX_ULP = 4.0  # the bound the product's exp must meet; the others are reported against it
SCALE = 10.0


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def require_isa(isa: str, flags: set[str]) -> None:
    missing = [f for f in ISAS[isa][1] if f not in flags]
    if missing:
        others = [i for i in ISAS if i != isa and all(f in flags for f in ISAS[i][1])]
        hint = f"; run with --isa {' '.join(others)}" if others else ""
        raise SystemExit(f"bench/cpu_exp.py: this CPU lacks {', '.join(missing)}, which the {isa} "
                         f"build needs{hint}")


def build(isa: str, build_root: str, verbose: bool = False):
    """bench/cpu_exp.cpp compiled for `isa` (ninja reuses an up-to-date build)."""
    from torch.utils import cpp_extension

    directory = os.path.join(build_root, isa)
    os.makedirs(directory, exist_ok=True)
    return cpp_extension.load(
        name=f"rcl_cpu_exp_{isa}",
        sources=[os.path.join(REPO, "bench", "cpu_exp.cpp")],
        extra_cflags=["-O3", "-std=c++20"] + ISAS[isa][0],
        extra_include_paths=[os.path.join(REPO, "csrc")],
        build_directory=directory,
        verbose=verbose,
    )


def implementations(modules: dict, dtype: torch.dtype) -> list[tuple[str, object, int]]:
    """(label, module, variant) of every implementation timed for `dtype`."""
    out = []
    for isa, mod in modules.items():
        out += [(f"hand {isa}", mod, HAND), (f"sleef {isa}", mod, SLEEF),
                (f"sleef+flush {isa}", mod, SLEEF_FLUSH)]
        if dtype == torch.float32:  # for double ATen's exp_u20 is exp
            out += [(f"exp_u20 {isa}", mod, U20), (f"exp_u20+flush {isa}", mod, U20_FLUSH)]
    out.append(("at::exp_", next(iter(modules.values())), ATEN))
    return out


def block(rows: int, cols: int, dtype: torch.dtype, seed: int = 0):
    """Logits scale·cos (cos uniform in [-1, 1]) and their row maxima."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2 - 1
    x = (SCALE * cos).to(dtype).contiguous()
    return x, x.max(dim=1).values.contiguous()


def sweep(dtype: torch.dtype, points: int, seed: int = 1):
    """One row over SWEEP[dtype]: a uniform grid and as many random bit patterns in the range."""
    lo, hi = SWEEP[dtype]
    grid = np.linspace(lo, hi, points, dtype=np.float64)
    np_dtype, uint = (np.float32, np.uint32) if dtype == torch.float32 else (np.float64, np.uint64)
    # Negative floats order by their bit patterns: every pattern from −0 to `lo` is in the range.
    bits_lo = np.array([-0.0], dtype=np_dtype).view(uint)[0]
    bits_hi = np.array([lo], dtype=np_dtype).view(uint)[0]
    rng = np.random.default_rng(seed)
    random = rng.integers(int(bits_lo), int(bits_hi), size=points, dtype=uint, endpoint=True)
    x = np.concatenate([grid.astype(np_dtype), random.view(np_dtype)])
    x = torch.from_numpy(x).reshape(1, -1).contiguous()
    return x, torch.zeros(1, dtype=dtype)


def accuracy(arg: np.ndarray, out: np.ndarray, cutoff: float) -> dict:
    """Errors of `out` as exp(arg) against long double exp, over the results at or above e^cutoff
    (normal numbers of the dtype: the product flushes the rest), and whether `out` is 0 below."""
    arg, out = arg.ravel(), out.ravel()
    ref = np.exp(arg.astype(np.longdouble))
    checked = (arg >= cutoff) & (ref >= np.finfo(arg.dtype).tiny)
    ref_c = ref[checked]
    err = np.abs(out[checked].astype(np.longdouble) - ref_c)
    ulp = np.spacing(ref_c.astype(arg.dtype)).astype(np.longdouble)
    below = arg < cutoff
    return {
        "max_rel_err": float(np.max(err / ref_c)) if ref_c.size else 0.0,
        "max_ulp": float(np.max(err / ulp)) if ref_c.size else 0.0,
        "checked": int(checked.sum()),
        "below_cutoff": int(below.sum()),
        "flushes": bool(np.all(out[below] == 0)),
        "nonfinite": int((~np.isfinite(out)).sum()),
    }


def measure_accuracy(impls, x: torch.Tensor, shift: torch.Tensor, cutoff: float) -> dict:
    arg = (x - shift[:, None]).contiguous()  # in the dtype, as every implementation computes it
    result = {}
    for label, mod, variant in impls:
        out, _ = mod.apply(variant, arg if variant == ATEN else x,
                           torch.zeros_like(shift) if variant == ATEN else shift)
        result[label] = accuracy(arg.numpy(), out.numpy(), cutoff)
    return result


def time_shape(impls, rows: int, cols: int, dtype: torch.dtype, rounds: int, reps: int) -> dict:
    x, shift = block(rows, cols, dtype)
    shifted = (x - shift[:, None]).contiguous()
    zero = torch.zeros_like(shift)
    work = torch.empty_like(x)
    inputs = {ATEN: (shifted, zero)}
    samples = {label: [] for label, _, _ in impls}
    round_medians = {label: [] for label, _, _ in impls}
    for label, mod, variant in impls:  # warm-up: code, tables, the pages of `work`
        mod.time_passes(variant, *inputs.get(variant, (x, shift)), work, 3)
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]  # no one always goes first
        for label, mod, variant in order:
            ns = mod.time_passes(variant, *inputs.get(variant, (x, shift)), work, reps)
            samples[label] += ns
            round_medians[label].append(statistics.median(ns))
    n = rows * cols
    size = torch.finfo(dtype).bits // 8
    result = {}
    for label, ns in samples.items():
        per_min, per_median = min(ns) / n, statistics.median(ns) / n
        result[label] = {
            "ns_per_element_min": per_min, "ns_per_element_median": per_median,
            "gelements_per_s_median": 1.0 / per_median,
            "gb_per_s_median": 2 * size / per_median,  # read and write of each element
            "round_medians_ns_per_element": [m / n for m in round_medians[label]],
            "passes": len(ns),
        }
    return result


def table(results: list[dict]) -> str:
    lines = ["| dtype | shape | implementation | ns/elem min | ns/elem median | Gelem/s | GB/s | "
             "max rel err (block) | max ulp (block) | max ulp (sweep) | flushes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for label, t in res["timing"].items():
            # × the product's exp of the same ISA (at::exp_: of the first ISA)
            isa = label.split()[-1] if label.split()[-1] in ISAS else res["isas"][0]
            hand = res["timing"][f"hand {isa}"]["ns_per_element_median"]
            acc, sw = res["accuracy_block"][label], res["accuracy_sweep"][label]
            rel = f" ({t['ns_per_element_median'] / hand:.2f}×)"
            lines.append(
                f"| {res['dtype']} | {res['rows']}×{res['cols']} | {label} | "
                f"{t['ns_per_element_min']:.3f} | {t['ns_per_element_median']:.3f}{rel} | "
                f"{t['gelements_per_s_median']:.2f} | {t['gb_per_s_median']:.1f} | "
                f"{acc['max_rel_err']:.2e} | {acc['max_ulp']:.2f} | {sw['max_ulp']:.2f} | "
                f"{'yes' if sw['flushes'] else 'no'} |")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", choices=list(ISAS), default=list(ISAS))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(128, 1512), (128, 5096)],
                        help="ROWSxCOLS of the block (default: 128x1512 128x5096)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"],
                        default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=20,
                        help="timed passes per implementation per round")
    parser.add_argument("--sweep-points", type=int, default=1 << 22,
                        help="grid points of the accuracy sweep (and as many random ones)")
    parser.add_argument("--build-dir", default=os.path.join(REPO, "build", "cpu_exp"))
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cpu-exp.json"))
    args = parser.parse_args(argv)

    flags = cpu_flags()
    for isa in args.isa:
        require_isa(isa, flags)
    modules = {isa: build(isa, args.build_dir) for isa in args.isa}
    torch.set_num_threads(1)  # at::exp_ as the epilogue runs: one thread per row panel
    meta = {
        "cpu_model": runner.cpu_model(),
        "isa_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "sse4"))),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "commit": runner.git_commit(),
        "compiler": subprocess.run(["c++", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
        "threads": torch.get_num_threads(),
        "rounds": args.rounds, "reps": args.reps, "max_ulp_bound": MAX_ULP,
        "logits": f"{SCALE} × cos, cos uniform in [-1, 1], minus the row max",
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results = []
    failures = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        impls = implementations(modules, dtype)
        sx, sshift = sweep(dtype, args.sweep_points)
        acc_sweep = measure_accuracy(impls, sx, sshift, CUTOFF[dtype])
        for rows, cols in args.shapes:
            x, shift = block(rows, cols, dtype)
            acc_block = measure_accuracy(impls, x, shift, CUTOFF[dtype])
            timing = time_shape(impls, rows, cols, dtype, args.rounds, args.reps)
            results.append({"dtype": name, "rows": rows, "cols": cols, "isas": args.isa,
                            "timing": timing, "accuracy_block": acc_block,
                            "accuracy_sweep": acc_sweep})
            for isa in args.isa:
                for acc in (acc_block[f"hand {isa}"], acc_sweep[f"hand {isa}"]):
                    if acc["max_ulp"] > MAX_ULP or not acc["flushes"] or acc["nonfinite"]:
                        failures.append(f"hand {isa} {name}: {acc}")
    meta["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(table(results))
    print(f"wrote {args.out}")
    if failures:
        print("the product's exp fails its accuracy bound:\n" + "\n".join(failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
