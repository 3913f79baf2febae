"""Compile the Triton LSE kernels for sm_90 without a GPU and report what the code became.

For each kernel, variant, dtype/precision and autotune config: whether `tl.dot` lowered to Hopper
warpgroup MMA (`wgmma.mma_async` in the PTX, HGMMA in the SASS) or to Ampere-style `mma.sync`
(HMMA) or FMA, and the registers, spills and shared memory ptxas reports. Choosing configs still
needs GPU timings (bench/triton_configs.py); this shows which ones compile to wgmma and which
spill.

    python bench/triton_sass.py                      # the default plan, a table on stdout
    python bench/triton_sass.py --out bench/results/triton-sass.txt --json rows.json
    python bench/triton_sass.py --kernels forward --variants default forward-all --dtypes bf16

Needs triton with its bundled ptxas and cuobjdump (CUDA toolkit); no GPU, no TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Compiling needs the real jit functions (not interpreted ones), and a fresh cache for every
# compile (compile_one), so that ptxas runs and logs its resource usage for every kernel, also
# for the same kernel at another shape.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns that its FMA-fusion default will change; compile with the current default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rcl_kernels.kernels.triton import configs, launch  # noqa: E402
from rcl_kernels.kernels.triton.variants import VARIANTS, Variant  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {  # name -> (torch dtype, allow_tf32)
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SHAPES = {  # name -> (N, M, d): BCL at N = 32,768 (C = 1000), BCL on iNaturalist (C = 8142)
    "bcl-n32768-d128": (32768, 33768, 128),
    "bcl-n32768-d256": (32768, 33768, 256),
    "inat-n512-d1024": (512, 8654, 1024),
}
KERNELS = ("forward", "dz", "dk", "one_pass")


def pointer_type(param: str, dtype: torch.dtype, labels: str = "i64") -> str:
    if param in ("z_ptr", "k_ptr"):
        return "*" + TRITON_TYPES[dtype]
    if param.endswith("lab_ptr"):
        return "*" + labels
    if param == "sem_ptr":
        return "*i32"
    return "*fp32"


def problem_values(kernel: str, n: int, m: int, d: int) -> dict:
    """The scalar arguments a launch at this size passes (one split: the large-N case)."""
    return dict(N=n, M=m, D=d, cols_per_split=m, rows_per_split=n, self_offset=0, scale=10.0,
                stride_zm=d, stride_km=d, N_KEY=launch.bucket(n), M_KEY=launch.bucket(m))


def compile_kernel(kernel: str, variant: str, dtype_name: str, shape: tuple, config,
                   labels: str = "i64"):
    """Compile `kernel` of `variant` at `shape` (N, M, d) with `config` for sm_90, as a launch
    would, with labels of type `labels` ("i64" or "i32"): (the compiled kernel, ptxas's log).
    Raises what triton.compile raises."""
    dtype, allow_tf32 = DTYPES[dtype_name]
    n, m, d = shape
    fn = configs.KERNELS[kernel][0]
    values = problem_values(kernel, n, m, d)
    constexprs = dict(config.kwargs,
                      INPUT_PRECISION=configs.input_precision(dtype, allow_tf32, Variant.of(variant)),
                      **configs.variant_meta(kernel, variant, d))
    if kernel == "forward":
        constexprs["WRITE_LSE"] = True
    elif kernel in ("dz", "dk"):
        constexprs.update(configs.chunk_meta(kernel, d, dtype, constexprs["INPUT_PRECISION"]))
    for name, rule in configs.HEURISTICS[kernel].items():  # D_PAD, EVEN_*: as the launch computes them
        constexprs[name] = rule({**values, **constexprs})
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_type(name, dtype, labels)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0 and values[name] != 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rcl-triton-sass-")
    triton.knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=TARGET,
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return compiled, log.getvalue()


def compile_one(job: dict) -> dict:
    """Compile one kernel/variant/dtype/config for sm_90; return its row of the report."""
    kernel, variant, dtype_name, shape_name = (job["kernel"], job["variant"], job["dtype"],
                                               job["shape"])
    config = configs.kernel_configs(kernel, variant, SHAPES[shape_name][2])[job["config"]]
    labels = job.get("labels", "i64")
    row = dict(kernel=kernel, variant=",".join(job["variants"]), dtype=dtype_name,
               shape=shape_name, config=configs.config_label(config), labels=labels)
    start = time.perf_counter()
    try:
        compiled, log = compile_kernel(kernel, variant, dtype_name, SHAPES[shape_name], config,
                                       labels)
    except Exception as error:  # a config that does not compile is a finding, not a crash
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row.update(ptx_counts(compiled.asm["ptx"]))
    row.update(ttgir_counts(compiled.asm["ttgir"]))
    row.update(sass_counts(compiled.asm["cubin"]))
    row.update(ptxas_usage(log))
    row["shared_bytes"] = compiled.metadata.shared
    return row


def ptx_counts(ptx: str) -> dict:
    """Warpgroup MMA, mma.sync, TF32 roundings, the asynchronous copies of a pipelined loop
    (cp.async, or TMA: cp.async.bulk) and the 64-bit equality tests (the label compares of
    int64 labels) in the PTX."""
    return dict(ptx_wgmma=ptx.count("wgmma.mma_async"), ptx_mma_sync=ptx.count("mma.sync"),
                ptx_setp_eq_64=len(re.findall(r"\bsetp\.(?:eq|ne)\.[bsu]64\b", ptx)),
                ptx_cvt_rna_tf32=ptx.count("cvt.rna.tf32.f32"),
                ptx_cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx)),
                ptx_tma=ptx.count("cp.async.bulk"))


def ttgir_counts(ttgir: str) -> dict:
    """ttgir_drains_in_loop: `async_wait {num = 0}` (wait for every copy in flight) in the body of
    a loop that holds another loop: an inner loop's software pipeline drained and restarted on
    every trip of the outer loop. ttgir_loads_in_loop: global loads (`tt.load`) left in a loop
    body, outside its software pipeline (the pipelined ones became async copies)."""
    stack, drains, loads = [], 0, 0  # one entry per open region: [is an scf.for, holds an scf.for]
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}") and stack:
            stack.pop()
        if "ttg.async_wait" in text and "num = 0 " in text:
            drains += any(is_for and inner for is_for, inner in stack)
        loads += " = tt.load " in text and any(is_for for is_for, _ in stack)
        if text.endswith("{"):
            is_for = "scf.for" in text
            if is_for:
                for frame in stack:
                    frame[1] = frame[1] or frame[0]
            stack.append([is_for, False])
    return dict(ttgir_drains_in_loop=drains, ttgir_loads_in_loop=loads)


def sass_counts(cubin: bytes) -> dict:
    """HGMMA (Hopper warpgroup MMA), HMMA (mma.sync), FFMA and all instructions in the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    return dict(sass_hgmma=len(re.findall(r"\bHGMMA\.", sass)),
                sass_hmma=len(re.findall(r"\bHMMA\.", sass)),
                sass_ffma=len(re.findall(r"\bFFMA\b", sass)),
                sass_instructions=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
                **loop_load_uses(sass))


_MATH_OPS = ("HGMMA", "HMMA", "FFMA")


def loop_load_uses(sass: str) -> dict:
    """Where the plain global loads (LDG; the pipeline's copies are LDGSTS) inside a loop of the
    SASS are first used. A loop is the span from a backward branch's target to the branch. For
    each LDG in a loop, its first use is the first later instruction that names one of the
    registers it writes (an STS into a dot operand's shared buffer, a compare, ...), and the
    multiply work between the two (HGMMA, HMMA, FFMA) is what can hide the load's latency.
    sass_loop_ldg: LDGs in a loop; sass_loop_ldg_hidden: those with multiply work before their
    first use; sass_loop_ldg_gap: the largest number of instructions from such an LDG to its
    first use."""
    code = []  # (address, opcode, operand text)
    for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        parts = text.split()
        if parts and parts[0].startswith("@"):
            parts = parts[1:]
        if parts:
            code.append((int(address, 16), parts[0], " ".join(parts[1:])))
    index = {address: i for i, (address, _, _) in enumerate(code)}
    loops = []
    for i, (address, op, operands) in enumerate(code):
        target = re.match(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            loops.append((index[int(target.group(1), 16)], i))
    loads = hidden = gap = 0
    for i, (_, op, operands) in enumerate(code):
        if not op.startswith("LDG.") or not any(a <= i <= b for a, b in loops):
            continue
        first = re.match(r"R(\d+)", operands)
        if first is None:
            continue
        width = 4 if ".128" in op else 2 if ".64" in op else 1
        regs = {f"R{int(first.group(1)) + r}" for r in range(width)}
        loads += 1
        math = 0
        for j in range(i + 1, len(code)):
            if regs & set(re.findall(r"\bR\d+\b", code[j][2])):
                break
            math += code[j][1].startswith(_MATH_OPS)
        hidden += math > 0
        gap = max(gap, j - i)
    return dict(sass_loop_ldg=loads, sass_loop_ldg_hidden=hidden, sass_loop_ldg_gap=gap)


def ptxas_usage(log: str) -> dict:
    """Registers and spills from ptxas -v (Triton runs it with -v and prints the log when asked)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None)


def tool(name: str) -> str:
    """A CUDA binary: the one bundled with triton, else the one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"triton_sass: {name} not found (bundled with triton or on PATH)")
    return found


def plan(kernels, variants, dtypes, shapes, indices=None, labels="i64") -> list[dict]:
    """One job per distinct compiled kernel (configs.kernel_builds), named by every variant
    that runs it; `indices`: only these indices into each kernel's autotune list."""
    jobs = []
    for shape in shapes:
        for dtype in dtypes:
            for kernel, names, config in configs.kernel_builds(variants, SHAPES[shape][2],
                                                         *DTYPES[dtype], kernels):
                index = configs.kernel_configs(kernel, names[0], SHAPES[shape][2]).index(config)
                if indices is not None and index not in indices:
                    continue
                jobs.append(dict(kernel=kernel, variant=names[0], variants=names, dtype=dtype,
                                 shape=shape, config=index, labels=labels))
    return jobs


def format_table(rows: list[dict]) -> str:
    columns = ["shape", "kernel", "variant", "dtype", "labels", "config", "ptx_wgmma", "sass_hgmma",
               "sass_hmma", "ptx_cp_async", "ptx_tma", "ttgir_loads_in_loop", "sass_loop_ldg", "sass_loop_ldg_hidden",
               "sass_loop_ldg_gap", "ptx_setp_eq_64",
               "sass_instructions", "registers", "spill_stores", "spill_loads",
               "shared_bytes", "ptx_cvt_rna_tf32", "compile_s", "error"]
    table = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def header() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "rcl_kernels/kernels/triton"],
                           capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return (f"# triton {triton.__version__}, target sm_90 (compile only, no GPU), commit "
            f"{commit}{' + uncommitted rcl_kernels/kernels/triton' if dirty else ''}\n"
            f"# ptx_wgmma / sass_hgmma: Hopper warpgroup MMA; sass_hmma: mma.sync; registers and "
            f"spills (bytes) from ptxas -v; shared_bytes from Triton's metadata\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--variants", nargs="+",
                        default=["default", "exp2-lean", "forward-all", "one-pass",
                                 "one-pass-atomic", "3xtf32"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "tf32", "fp32"],
                        choices=sorted(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=["bcl-n32768-d128", "inat-n512-d1024"],
                        choices=sorted(SHAPES))
    parser.add_argument("--configs", nargs="+", type=int, metavar="INDEX",
                        help="only these indices into each kernel's autotune configs (0: the "
                             "one that runs when autotuning is off)")
    parser.add_argument("--labels", choices=["i64", "i32"], default="i64",
                        help="label dtype the kernels are compiled for (default: i64)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    tool("cuobjdump")
    jobs = plan(args.kernels, args.variants, args.dtypes, args.shapes, args.configs, args.labels)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs))
    text = header() + format_table(rows) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
