"""Compile-only checks of the GPU kernels' machine code for sm_90 (no GPU needed).

What the interpreter and the host emulation cannot see: whether a loop is software-pipelined,
whether registers spill, whether a hand-over between blocks waits on one load at a time.
- The CUDA mma.sync backward (csrc/cuda/mma_lse_kernels.cu, nvcc -cubin, cuobjdump -sass): in
  the dz and dk hand-overs every load of the other blocks' sums comes before the adds and
  stores, so the SASS has a few groups of loads then stores, not one load -> store chain per
  element.
- The Triton kernels (bench/triton_sass.py, in a child process: the kernels must be built
  without TRITON_INTERPRET, which tests/conftest.py sets for this process): the deterministic
  one-pass backward's main loop is pipelined (cp.async in the PTX, and its 2- and 3-stage
  configs differ in shared memory); the default forward's column and d loops form one pipeline
  (no drain per column tile); the first config of every kernel (the one that runs when
  autotuning is off) spills no registers at d <= 256; the dz and dk kernels leave no global load
  outside their pipeline at d = 128, and at d = 1024 every plain load in their loops has multiply
  work before its first use; int32 labels compare in 32 bits. These compile for minutes
  on 2 cores, so they run only with RCL_TEST_SASS=1 (make check-sass).

Each check skips when its tools are missing (nvcc; cuobjdump, bundled with Triton or on PATH).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_tool(name: str) -> str | None:
    """A CUDA binary: the one bundled with triton (found without importing it), else PATH's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    return shutil.which(name)


# --------------------------------------------------------------------------------------------------
# CUDA mma.sync backward
# --------------------------------------------------------------------------------------------------

# As the Makefile's check-cuda compiles the sources (the defines PyTorch's CUDAExtension passes).
_NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-D__CUDA_NO_HALF_OPERATORS__",
               "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


@pytest.fixture(scope="module")
def mma_sass(tmp_path_factory) -> dict[str, list[str]]:
    """{kernel name: its SASS instructions} of csrc/cuda/mma_lse_kernels.cu for sm_90."""
    nvcc, cuobjdump = shutil.which("nvcc"), _cuda_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    cubin = tmp_path_factory.mktemp("mma-sass") / "mma_lse_kernels.cubin"
    subprocess.run([nvcc, *_NVCC_FLAGS, "-arch=sm_90", "-cubin", "-I", str(ROOT / "csrc"),
                    str(ROOT / "csrc/cuda/mma_lse_kernels.cu"), "-o", str(cubin)],
                   check=True, capture_output=True, text=True)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    return sass_functions(sass)


def sass_functions(sass: str) -> dict[str, list[str]]:
    """cuobjdump -sass output as {function name: [instruction, ...]}."""
    functions = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        functions[name.strip()] = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", body)
    return functions


def global_access_string(instructions: list[str]) -> str:
    """The kernel's global loads and stores in program order: L for a load through L2 (strong,
    as ld.cg / ld.acquire compile: other blocks' sums and the semaphores), S for a store, '.'
    for any other global load."""
    out = []
    for ins in instructions:
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        if op.startswith("LDG"):
            out.append("L" if ".STRONG." in op else ".")
        elif op.startswith("STG"):
            out.append("S")
    return "".join(out)


def test_mma_backward_hand_over_loads_before_it_stores(mma_sass):
    """In the ordered dz and dk additions every load of the current sums comes first: the SASS
    of each backward kernel has a handful of load groups (dz and dk, inside the matrix and on
    its edge), not a store between every two loads (32-64 per hand-over when each element is
    loaded, added and stored in turn)."""
    kernels = {name: ins for name, ins in mma_sass.items() if "mma_lse_backward_kernel" in name}
    assert len(kernels) == 5, sorted(mma_sass)  # bf16, fp16, tf32, 3xtf32, fp64
    for name, instructions in kernels.items():
        accesses = global_access_string(instructions)
        store_then_load = len(re.findall(r"S\.*L", accesses))
        longest_load_group = max(len(run) for run in re.findall(r"L+", accesses))
        assert store_then_load <= 4 and longest_load_group >= 8, (name, accesses)


# --------------------------------------------------------------------------------------------------
# Triton kernels (bench/triton_sass.py in a child process)
# --------------------------------------------------------------------------------------------------
# Compiling them takes minutes on 2 cores: run with RCL_TEST_SASS=1 (make check-sass).
_TRITON_SKIP = (None if os.environ.get("RCL_TEST_SASS") == "1" else
                "compiles Triton kernels for minutes; run with RCL_TEST_SASS=1 (make check-sass)")
# The variants whose kernels cover every build the checks below need: the default kernels, the
# resident-Z forward, both one-pass forms.
_FIRST_CONFIG_VARIANTS = ["default", "forward-all", "one-pass", "one-pass-atomic"]


def _triton_rows(tmp_path, *args) -> list[dict]:
    if _TRITON_SKIP is not None:
        pytest.skip(_TRITON_SKIP)
    if importlib.util.find_spec("triton") is None or _cuda_tool("cuobjdump") is None:
        pytest.skip("needs triton and cuobjdump")
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "bench/triton_sass.py"), *args, "--json",
                    str(out)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def test_triton_one_pass_deterministic_loop_is_pipelined(tmp_path):
    """The deterministic one-pass backward's main loop loads the next Z tiles with cp.async
    while the current one is handed over, and its 2- and 3-stage configs differ (a ring of 2 or
    3 Z buffers in shared memory)."""
    rows = _triton_rows(tmp_path, "--kernels", "one_pass", "--variants", "one-pass", "--dtypes",
                        "bf16", "--shapes", "bcl-n32768-d128")
    for row in rows:
        assert "error" not in row and row["ptx_cp_async"] + row["ptx_tma"] > 0, row
    shared = {row["config"]: row["shared_bytes"] for row in rows}
    assert shared["64x64-w8-s2"] < shared["64x64-w8-s3"], rows


@pytest.mark.parametrize("shape", ["bcl-n32768-d128", "bcl-n32768-d256"])
def test_triton_first_configs_do_not_spill(tmp_path, shape):
    """The config that runs when autotuning is off (the first of each list, chosen per d) keeps
    every kernel free of register spills at d <= 256, bf16."""
    rows = _triton_rows(tmp_path, "--variants", *_FIRST_CONFIG_VARIANTS, "--dtypes", "bf16",
                        "--shapes", shape, "--configs", "0")
    assert {r["kernel"] for r in rows} == {"forward", "dz", "dk", "one_pass"}, rows
    for row in rows:
        assert "error" not in row and row["spill_stores"] == row["spill_loads"] == 0, row


def test_triton_default_forward_pipelines_across_column_tiles(tmp_path):
    """The default forward streams Z and K in d chunks through one flattened, pipelined loop:
    no pipeline of the d loop is drained (async_wait 0) and restarted on every column tile."""
    rows = _triton_rows(tmp_path, "--kernels", "forward", "--variants", "default", "--dtypes",
                        "bf16", "--shapes", "bcl-n32768-d128", "--configs", "0")
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["ptx_cp_async"] > 0 and rows[0]["ttgir_drains_in_loop"] == 0, rows


def test_triton_backward_loads_each_tile_once(tmp_path):
    """With the whole row in one d chunk (bf16 d = 128), the dz and dk kernels load each K (dz)
    or Z (dk) tile once, in the pipelined loop, for both of their products: no global load is
    left in a loop body (a second load of the tile for the gradient product was one), and the
    loop copies with cp.async."""
    rows = _triton_rows(tmp_path, "--kernels", "dz", "dk", "--variants", "default", "--dtypes",
                        "bf16", "--shapes", "bcl-n32768-d128", "--configs", "0")
    assert {r["kernel"] for r in rows} == {"dz", "dk"}, rows
    for row in rows:
        assert "error" not in row and row["ttgir_loads_in_loop"] == 0, row
        assert row["ptx_cp_async"] > 0, row


def test_triton_int32_labels_compare_in_32_bits(tmp_path):
    """Labels compare in the dtype they come in: kernels compiled for int32 labels have no
    64-bit equality test in their PTX, those for int64 labels one per logit of a thread."""
    args = ("--variants", "default", "--dtypes", "bf16", "--shapes", "bcl-n32768-d128",
            "--configs", "0")
    wide = _triton_rows(tmp_path, *args)
    narrow = _triton_rows(tmp_path, *args, "--labels", "i32")
    assert {r["kernel"] for r in narrow} == {"forward", "dz", "dk"}, narrow
    for row in wide:
        assert "error" not in row and row["ptx_setp_eq_64"] > 0, row
    for row in narrow:
        assert "error" not in row and row["ptx_setp_eq_64"] == 0, row


@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_triton_chunked_backward_loads_are_covered(tmp_path, dtype):
    """With d in several chunks (d = 1024), what the dz and dk kernels load outside their
    pipeline (dz: the column labels and biases, then the K chunk of P·K; dk: the row vectors,
    then the Z chunk) is not waited for at once: in the SASS, every plain global load (LDG) in a
    loop has multiply work (HGMMA) between it and its first use. The label and bias loads in the
    epilogue of a column tile, used a few instructions later, failed this."""
    rows = _triton_rows(tmp_path, "--kernels", "dz", "dk", "--variants", "default", "--dtypes",
                        dtype, "--shapes", "inat-n512-d1024", "--configs", "0")
    assert {r["kernel"] for r in rows} == {"dz", "dk"}, rows
    for row in rows:
        assert "error" not in row and row["spill_stores"] == 0, row
        assert row["sass_loop_ldg"] > 0, row  # the chunked path: plain loads in the loop
        assert row["sass_loop_ldg_hidden"] == row["sass_loop_ldg"], row


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_sass_plans_one_job_per_build_without_compiling():
    """The planning half of bench/triton_sass.py (no compilation, so it runs in every suite): the
    jobs the SASS checks above would compile, with --configs selecting indices."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import triton_sass
    finally:
        sys.path.remove(str(ROOT / "bench"))
    jobs = triton_sass.plan(["dz", "dk"], ["default"], ["bf16"], ["inat-n512-d1024"], [0])
    assert sorted(job["kernel"] for job in jobs) == ["dk", "dz"]
    assert all(job["config"] == 0 for job in jobs)
