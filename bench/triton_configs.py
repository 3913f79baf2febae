"""Time every autotune config of every Triton LSE kernel and variant, per shape and dtype.

One GPU run shows which configs and which variants (rcl_kernels.kernels.triton.variants.VARIANTS) matter:
each kernel (forward, dz, dk, one_pass) runs alone with each config of its autotune list, then
autotuned ("autotune" rows: the config the autotuner picks, over the same list). Kernels that
several variants share (the backward ignores the forward-only flags) are timed once; their row
names every variant. Rows go to a JSON list, rewritten after every row, so a run stopped by its
budget keeps what it measured.

    python bench/triton_configs.py --out triton-configs.json --budget-s 240     # on a GPU
    python bench/triton_configs.py --smoke --out /tmp/smoke.json                 # CPU, interpreted

Timing: triton.testing.do_bench (CUDA events, L2 flushed before each call), median and 20th/80th
percentiles. --smoke runs tiny shapes under TRITON_INTERPRET=1 and times one call with a wall
clock: it checks that the script and every config run, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = {  # name -> (N anchors, M columns, d, C classes): the BCL layout, K = [Z; centers]
    "bcl-n32768-d128": (32768, 33768, 128, 1000),
    "bcl-n8192-d128": (8192, 9192, 128, 1000),
    "inat-n512-d1024": (512, 8654, 1024, 8142),
    "bcl-n131072-d128": (131072, 132072, 128, 1000),
    "smoke": (40, 56, 48, 16),  # --smoke: several tiles of the interpreter's 16 x 16 blocks
}
DTYPES = {"bf16": ("bfloat16", False), "fp16": ("float16", False), "tf32": ("float32", True),
          "fp32": ("float32", False)}
KERNELS = ("forward", "dz", "dk", "one_pass")
# The GPU plan, most important first (a budget stops it where it is): the shapes that decide.
DEFAULT_PLAN = [("bcl-n32768-d128", "bf16"), ("bcl-n8192-d128", "bf16"),
                ("bcl-n32768-d128", "tf32"), ("bcl-n32768-d128", "fp32"),
                ("inat-n512-d1024", "bf16")]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the rows")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape under the Triton interpreter (CPU): checks, not timings")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        help="shapes to run (default: the GPU plan's)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="dtypes to run (default: the GPU plan's)")
    parser.add_argument("--variants", nargs="+", help="presets of rcl_kernels.kernels.triton.variants.VARIANTS (default: all)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new timings after this many seconds")
    return parser.parse_args(argv)


def plan(args) -> list[tuple[str, str]]:
    if args.smoke:
        return [("smoke", dtype) for dtype in (args.dtypes or ["bf16", "tf32", "fp32"])]
    if args.shapes is None and args.dtypes is None:
        return DEFAULT_PLAN
    return [(shape, dtype) for shape in (args.shapes or ["bcl-n32768-d128"])
            for dtype in (args.dtypes or ["bf16"])]


def make_inputs(shape: str, dtype_name: str, device):
    """The op's arguments in the BCL layout, and an upstream gradient."""
    import torch

    n, m, d, c = SHAPES[shape]
    dtype = getattr(torch, DTYPES[dtype_name][0])
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    centers = torch.nn.functional.normalize(torch.randn(m - n, d, generator=gen), dim=1)
    weights = 0.01 ** (torch.arange(c, dtype=torch.float64) / max(c - 1, 1))  # long tail, rho=100
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    col_labels = torch.cat([labels, torch.arange(m - n) % c])
    return dict(
        z=z.to(device, dtype), k=torch.cat([z, centers]).to(device, dtype),
        row_labels=labels.to(device), col_labels=col_labels.to(device),
        row_bias=(0.1 * torch.randn(n, generator=gen)).to(device),
        col_bias=(0.1 * torch.randn(m, generator=gen)).to(device),
        self_offset=0, scale=10.0,  # temperature 0.1
    ), (torch.randn(n, generator=gen) / n).to(device)


def kernel_call(launch, kernel, inputs, grad, lse, allow_tf32, variant, config):
    """A zero-argument function that launches `kernel` (and only it) on the inputs."""
    if kernel == "forward":
        return lambda: launch.forward(**inputs, allow_tf32=allow_tf32, variant=variant, config=config)
    b = launch.BackwardInputs.of(grad, inputs["z"], inputs["k"], inputs["row_labels"],
                                 inputs["col_labels"], inputs["row_bias"], inputs["col_bias"], lse,
                                 inputs["self_offset"], inputs["scale"], allow_tf32, variant)
    run = {"dz": launch.dz_pass, "dk": launch.dk_pass, "one_pass": launch.one_pass}[kernel]
    return lambda: run(b, None, config)


def config_label(configs, config) -> str:
    return "autotune" if config is None else configs.config_label(config)


def time_call(fn, args, smoke) -> dict:
    if smoke:
        start = time.perf_counter()
        fn()
        return dict(median_ms=(time.perf_counter() - start) * 1e3, p20_ms=None, p80_ms=None,
                    timer="time.perf_counter, one interpreted call")
    import triton

    median, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                               quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80,
                timer="triton.testing.do_bench (CUDA events, L2 flushed before each call)")


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before rcl_kernels.kernels.triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import runner  # bench/runner.py: the commit and device naming of every bench row
    import torch
    import triton

    from rcl_kernels.kernels import triton as backend
    from rcl_kernels.kernels.triton import configs, launch
    from rcl_kernels.kernels.triton.variants import VARIANTS, Variant

    device = torch.device("cpu" if args.smoke else "cuda")
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise SystemExit(f"triton_configs: the Triton kernels cannot run on {device}: {reason}")
    device_name = ("cpu (triton interpreter)" if args.smoke
                   else torch.cuda.get_device_name(device))
    common = dict(device=device_name, commit=runner.git_commit(), triton=triton.__version__,
                  torch=torch.__version__)
    start = time.monotonic()
    rows, skipped = [], 0
    for shape, dtype_name in plan(args):
        n, m, d, c = SHAPES[shape]
        allow_tf32 = DTYPES[dtype_name][1]
        inputs, grad = make_inputs(shape, dtype_name, device)
        # The backward's lse, from one config (no autotuning before the first timing).
        lse = launch.forward(**inputs, allow_tf32=allow_tf32,
                         config=configs.kernel_configs("forward", "default", d)[0])
        builds = configs.kernel_builds(args.variants or list(VARIANTS), d, inputs["z"].dtype,
                                 allow_tf32, args.kernels, autotuned=True)
        for kernel, variants, config in builds:
            if time.monotonic() - start > args.budget_s:
                skipped += 1
                continue
            variant = Variant.of(variants[0])
            row = dict(kernel=kernel, variant=",".join(variants), config=config_label(configs, config),
                       shape=shape, N=n, M=m, d=d, C=c, dtype=dtype_name,
                       precision=configs.input_precision(inputs["z"].dtype, allow_tf32, variant),
                       **common)
            try:
                fn = kernel_call(launch, kernel, inputs, grad, lse, allow_tf32, variant, config)
                row.update(time_call(fn, args, args.smoke))
            except Exception as error:  # e.g. a config that needs more shared memory than an SM
                row.update(median_ms=None, error=f"{type(error).__name__}: {error}"[:300])
            rows.append(row)
            write_rows(args.out, rows)
            ms = "error" if row["median_ms"] is None else f"{row['median_ms']:.3f} ms"
            print(f"{shape} {dtype_name} {kernel:8s} {row['config']:18s} {ms:>12s}  "
                  f"{row['variant']}", flush=True)
            if "error" in row and not args.smoke and "out of resource" not in row["error"]:
                try:  # a sticky CUDA error makes every later row fail: stop here
                    torch.cuda.synchronize()
                except Exception:
                    print("triton_configs: CUDA error, stopping", file=sys.stderr)
                    return 1
    write_rows(args.out, rows)
    print(f"{len(rows)} rows in {args.out}; {skipped} timings skipped by the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
