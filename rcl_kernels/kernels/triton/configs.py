"""The Triton backend's launch configurations and per-launch constants: the autotune configs of
each kernel, the heuristics that derive the EVEN_* and padding constexprs from the chosen config,
each variant's constexpr flags, and the d chunking of the backward.

Under the interpreter one small fixed config runs (several tiles, several d chunks even at test
sizes, so the loops and masks are exercised). On the GPU each kernel autotunes over a few configs
(chosen from ptxas register/spill reports for sm_90, bench/triton_sass.py; bench/triton_configs.py
times each) keyed on d, the dtypes, the product precision, the variant's flags and power-of-two
buckets of N and M; RCL_KERNELS_TRITON_AUTOTUNE=0 (read at import) keeps the first config only.
Tests and bench/triton_configs.py run every config explicitly (`config=`).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton

from . import INTERPRETED
from .forward import _fwd_kernel
from .one_pass import _one_pass_kernel
from .two_pass import _dk_kernel, _dz_kernel
from .variants import Variant

_INTERP_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
_INTERP_ONE_PASS = dict(BLOCK_M=16, BLOCK_N=16)
_INTERP_BLOCK_D_MAX = 64
# Up to this d there is one d chunk (no recompute); larger d is split into chunks, each of
# which recomputes the logits (bf16 d=1024: 4x the Z·Kᵀ work, but no N×M buffer and no
# atomics). fp32 tiles take twice the registers/shared memory, so their chunks are narrower.
_GPU_BLOCK_D_MAX = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 128}

def _configs(*tiles):
    """triton.Configs of (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) rows."""
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps,
                          num_stages=stages)
            for bm, bn, bk, warps, stages in tiles]

# Chosen with ptxas resource reports for sm_90 (no GPU timing yet): every config below
# compiles without large register spills for bf16/fp16/tf32. The first is the one used when
# autotuning is off.
_FWD_CONFIGS = _configs((64, 64, 32, 8, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3),
                        (128, 64, 64, 8, 3), (128, 128, 32, 8, 3))
# Variant.wide_configs: 128-wide tiles with 8 warps and deeper pipelines. ptxas for
# sm_90 (bench/results/triton-sass-*.txt): no spills for bf16/fp16/TF32; fp32 FMA spills
# (kilobytes with a resident Z tile), and TF32 with a resident Z tile needs more shared
# memory than an SM has for 128 x 128 and 64 x 128 x 4 stages: the autotuner drops what
# fails to launch and times the rest.
_FWD_WIDE_CONFIGS = _configs((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4),
                             (64, 128, 64, 8, 4))
# The backward also holds a [block, BLOCK_D] fp32 accumulator (BLOCK_D up to 256), so its
# parallel block (BLOCK_M for dz, BLOCK_N for dk) is 32-64 and 8 warps share it. Rows:
# (parallel block, streamed block, BLOCK_K, warps, stages); dk's configs are dz's with
# BLOCK_M and BLOCK_N swapped.
_BACKWARD_TILES = ((64, 64, 32, 8, 2), (64, 64, 64, 8, 2), (64, 32, 64, 8, 3),
                   (64, 64, 32, 8, 1))
_DZ_CONFIGS = _configs(*_BACKWARD_TILES)
_DK_CONFIGS = _configs(*((bn, bm, *rest) for bm, bn, *rest in _BACKWARD_TILES))

# One pass: a [BLOCK_N, d] K tile and fp32 dk stay in registers while [BLOCK_M, d] Z tiles
# and fp32 dz contributions stream through. ptxas for sm_90 at d = 128: 64 x 64 with 8 warps
# takes 254 registers without spills (bf16); 4 warps, 16 warps (128 registers) or 128-wide
# tiles spill hundreds of bytes. 32 x 64 spills nowhere (also bf16 d = 256) but runs its
# 32-row product on mma.sync instead of wgmma. At 128 < d <= 256 the 64 x 64 tiles spill
# (about 500 bytes deterministic, 180 with atomics), and the deterministic kernel's pipelined
# loop spills 68 bytes with them at d = 128, so there the spill-free 32 x 64 (238 registers
# at d = 256, pipelined) comes first: it is what runs when autotuning is off.
_ONE_PASS_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=8, num_stages=st)
    for bm, bn, st in ((64, 64, 2), (64, 64, 3), (32, 64, 2))
]
_ONE_PASS_WIDE_D = 128  # above this d (any d when deterministic), 32 x 64 comes first

def _pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))

def _even_d(a) -> bool:
    if a.get("RESIDENT_Z") or "BLOCK_K" not in a:
        chunk = a["D_PAD"]
    else:
        chunk = a["BLOCK_D"] if a.get("ONE_CHUNK") else a["BLOCK_K"]
    return bool(a["LEAN_MASKS"]) and a["D"] % chunk == 0

# EVEN_*: every tile along that axis is full (LEAN_MASKS only; the default masks every tile).
# Computed per launch from the chosen config, so they sit under the autotuner. A split's
# tiles are full when the split length is a multiple of the block, too.
HEURISTICS = {
    "forward": {
        "D_PAD": lambda a: _pow2_at_least_16(a["D"]),
        "EVEN_M": lambda a: bool(a["LEAN_MASKS"]) and a["N"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: (bool(a["LEAN_MASKS"]) and a["M"] % a["BLOCK_N"] == 0
                             and a["cols_per_split"] % a["BLOCK_N"] == 0),
        "EVEN_D": _even_d,
    },
    "dz": {
        "EVEN_M": lambda a: bool(a["LEAN_MASKS"]) and a["N"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: (bool(a["LEAN_MASKS"]) and a["M"] % a["BLOCK_N"] == 0
                             and a["cols_per_split"] % a["BLOCK_N"] == 0),
        "EVEN_D": _even_d,
    },
    "dk": {
        "EVEN_M": lambda a: (bool(a["LEAN_MASKS"]) and a["N"] % a["BLOCK_M"] == 0
                             and a["rows_per_split"] % a["BLOCK_M"] == 0),
        "EVEN_N": lambda a: bool(a["LEAN_MASKS"]) and a["M"] % a["BLOCK_N"] == 0,
        "EVEN_D": _even_d,
    },
    "one_pass": {
        "D_PAD": lambda a: _pow2_at_least_16(a["D"]),
        "EVEN_M": lambda a: (bool(a["LEAN_MASKS"]) and a["N"] % a["BLOCK_M"] == 0
                             and a["rows_per_split"] % a["BLOCK_M"] == 0),
        "EVEN_N": lambda a: bool(a["LEAN_MASKS"]) and a["M"] % a["BLOCK_N"] == 0,
        "EVEN_D": _even_d,
    },
}
# name -> (jit function, heuristics-wrapped kernel launched by the host)
KERNELS = {
    name: (fn, triton.heuristics(HEURISTICS[name])(fn))
    for name, fn in (("forward", _fwd_kernel), ("dz", _dz_kernel), ("dk", _dk_kernel),
                     ("one_pass", _one_pass_kernel))
}
_INTERP_META = {"forward": _INTERP_TILES, "dz": _INTERP_TILES, "dk": _INTERP_TILES,
                "one_pass": _INTERP_ONE_PASS}
# Autotune keys: what changes the best config. The autotuner adds the tensor dtypes itself.
_KEY = ["D", "N_KEY", "M_KEY", "INPUT_PRECISION", "EXP2", "LEAN_MASKS"]
_KEYS = {"forward": _KEY + ["WRITE_LSE", "RESIDENT_Z", "GROUP_M"],
         "dz": _KEY + ["BLOCK_D"], "dk": _KEY + ["BLOCK_D"],
         "one_pass": _KEY + ["DETERMINISTIC"]}
# Buffers a kernel accumulates into: zeroed before each autotuning run and after the last.
_RESET = {"one_pass": ["dz_ptr", "sem_ptr"]}
_TUNE = os.environ.get("RCL_KERNELS_TRITON_AUTOTUNE", "1").strip().lower()
# RCL_KERNELS_TRITON_AUTOTUNE=0 (quick CI runs): the first config only, no tuning.
_TUNED_CONFIGS = 1 if _TUNE in ("0", "false", "off", "no") else None

@functools.cache
def _autotuned(name: str, configs: tuple) -> Callable:
    return triton.autotune(configs=list(configs[:_TUNED_CONFIGS]), key=_KEYS[name],
                           reset_to_zero=_RESET.get(name))(KERNELS[name][1])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
# Split lengths are multiples of the largest BLOCK_M/BLOCK_N of any config, so only the last tile of
# a split is partial (interpreter: 16, so that small tests exercise the splits too). The planner


def input_precision(dtype: torch.dtype, allow_tf32: bool, variant: Variant) -> str:
    """How the products take their operands: "tf32" (fp32 rounded to TF32), "tf32x3" (fp32 as a
    sum of two TF32 parts, three products: Variant.fp32_highest) or "ieee" (the input dtype
    as it is: tensor cores for bf16/fp16, FMA for fp32)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else variant.fp32_highest



def _block_d(d: int, dtype: torch.dtype) -> int:
    cap = _INTERP_BLOCK_D_MAX if INTERPRETED else _GPU_BLOCK_D_MAX[dtype]
    return min(_pow2_at_least_16(d), cap)


# Whole-row tiles, from ptxas for sm_90 (bench/triton_sass.py): fp32 FMA and 3xTF32 products
# spill kilobytes with them (dz d = 128), and dk, which also pipelines four row vectors, spills
# above 256 bytes of row (bf16 d = 256: 56 bytes, TF32 d = 128: 248 bytes). These take d in
# chunks of BLOCK_K for S and reload the K (Z) chunk for the second product.
_DK_ONE_CHUNK_BYTES = 256


def chunk_meta(kernel: str, d: int, dtype: torch.dtype, precision: str) -> dict:
    """BLOCK_D and ONE_CHUNK of the dz or dk kernel: ONE_CHUNK (the whole row in one d chunk,
    tensor-core products) loads each K (dz) or Z (dk) tile once for both products."""
    block_d = _block_d(d, dtype)
    tensor_cores = precision == "tf32" or (precision == "ieee" and dtype != torch.float32)
    fits = kernel == "dz" or d * dtype.itemsize <= _DK_ONE_CHUNK_BYTES
    return dict(BLOCK_D=block_d, ONE_CHUNK=d <= block_d and tensor_cores and fits)


_RESIDENT_MAX_D = 256  # Variant.resident_z: largest d whose row tile stays resident


def _resident(variant: Variant, d: int) -> bool:
    return variant.resident_z and d <= _RESIDENT_MAX_D


# Variant.backward = "one_pass": largest d per product precision (registers hold a K tile and
# dk of width d). From ptxas for sm_90: fp32 FMA products ("ieee") and 3xTF32 spill kilobytes
# (and 3xTF32 needs more shared memory than an SM has), so they keep the two-pass kernels.
_ONE_PASS_MAX_D = {(torch.bfloat16, "ieee"): 256, (torch.float16, "ieee"): 256,
                   (torch.float32, "tf32"): 128}


def backward_kernels(variant: Variant | str, d: int, dtype: torch.dtype,
                     allow_tf32: bool = False) -> tuple[str, ...]:
    """The kernels the backward of `variant` runs for this d, dtype and allow_tf32."""
    variant = Variant.of(variant)
    precision = input_precision(dtype, allow_tf32, variant)
    if variant.backward == "one_pass" and d <= _ONE_PASS_MAX_D.get((dtype, precision), 0):
        return ("one_pass",)
    return ("dz", "dk")


def variant_meta(kernel: str, variant: Variant | str, d: int) -> dict:
    """The constexpr flags kernel `kernel` takes for `variant` at feature size d (the host passes
    them; bench/triton_sass.py compiles with them)."""
    variant = Variant.of(variant)
    meta = dict(EXP2=variant.exp2, LEAN_MASKS=variant.lean_masks)
    if kernel == "forward":
        meta.update(RESIDENT_Z=_resident(variant, d), GROUP_M=variant.group_m)
    if kernel == "one_pass":
        meta.update(DETERMINISTIC=variant.deterministic)
    return meta


def kernel_configs(kernel: str, variant: Variant | str = "default", d: int = 128) -> list:
    """The autotune configs of `kernel` ("forward", "dz", "dk", "one_pass") for `variant` and d
    (bench/triton_configs.py times each; tests run each)."""
    variant = Variant.of(variant)
    if kernel == "forward":
        configs = _FWD_CONFIGS + (_FWD_WIDE_CONFIGS if variant.wide_configs else [])
        if _resident(variant, d):  # BLOCK_K is unused: one config per other choice
            unique = {}
            for c in configs:
                key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                unique.setdefault(key, c)
            configs = list(unique.values())
        return configs
    if kernel == "dz":
        return list(_DZ_CONFIGS)
    if kernel == "dk":
        return list(_DK_CONFIGS)
    if kernel == "one_pass":
        if d > _ONE_PASS_WIDE_D or variant.deterministic:  # spill-free first (see above)
            return [_ONE_PASS_CONFIGS[2], *_ONE_PASS_CONFIGS[:2]]
        return list(_ONE_PASS_CONFIGS)
    raise ValueError(f"kernel must be one of forward, dz, dk, one_pass, got {kernel!r}")


def kernel_builds(variants, d: int, dtype: torch.dtype, allow_tf32: bool,
                  kernels=("forward", "dz", "dk", "one_pass"), autotuned: bool = False) -> list:
    """(kernel, [variant names], config) for every distinct kernel build the named variants run
    at feature size d, dtype and allow_tf32: variants whose flags and product precision are the
    same for a kernel (the backward ignores the forward-only flags) share a build. autotuned:
    after a kernel's configs, (kernel, variants, None) for the kernel autotuned over them."""
    builds = {}
    for name in variants:
        variant = Variant.of(name)
        runs = ("forward", *backward_kernels(variant, d, dtype, allow_tf32))
        for kernel in (k for k in kernels if k in runs):
            configs = kernel_configs(kernel, variant, d)
            build = (kernel, tuple(sorted(variant_meta(kernel, variant, d).items())),
                     input_precision(dtype, allow_tf32, variant))
            keys = [config_label(c) for c in configs]
            for config, key in zip([*configs, None] if autotuned else configs,
                                   [*keys, tuple(keys)]):
                builds.setdefault((*build, key), (kernel, [], config))[1].append(name)
    return list(builds.values())


def config_label(config) -> str:
    """A config as BLOCK_MxBLOCK_N[xBLOCK_K]-w<warps>-s<stages> (benchmark and report rows)."""
    tile = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                    if b in config.kwargs)
    return f"{tile}-w{config.num_warps}-s{config.num_stages}"

