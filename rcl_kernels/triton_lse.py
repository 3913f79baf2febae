"""Triton kernels for the masked, biased log-sum-exp op (see csrc/ops.cpp for the definition).

    t_ij  = scale·<z_i, k_j> + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j])
    lse_i = log Σ_{j ≠ i + self_offset} exp(t_ij)            (−inf when no column is left)
    p_ij  = exp(t_ij − lse_i)                                  (0 for the self column / lse = −inf)
    dz    = scale · (g ⊙ P) · K        dk = scale · (g ⊙ P)ᵀ · Z     (g = grad_lse)

It is attention whose only output is the LSE (keys = values = K), so the kernels follow the
flash-attention pattern: the forward streams column tiles with an online (max, sumexp) pair and
saves only lse [N]; the backward recomputes t from Z, K and lse. No N×M buffer exists anywhere;
extra memory is O((N + M)·d) (split partials included).

Kernels
- forward: program = (row block, column split). The dot product of a tile loops over d in BLOCK_K
  chunks (any d, odd ones masked). When the row blocks alone cannot fill the GPU (N=512, M=8654),
  the columns are split across programs and the partial (max, sumexp) pairs are merged by a tiny
  second kernel.
- dz: program = (row block, d-output chunk, column split); dz_i = scale·g_i·Σ_j p_ij·k_j.
- dk: program = (column block, d-output chunk, row split); dk_j = scale·Σ_i g_i·p_ij·z_i.
  Both are deterministic: every program owns its output tile, split partials are summed by torch
  in a fixed order. When the whole row is one d chunk (chunk_meta), each streamed K (dz) or Z
  (dk) tile is loaded once, by the pipelined loop, for both of the kernel's products.
- one pass (a variant; tensor-core products, d ≤ 256): program = (column block, row split) with
  K and dk in registers;
  S and P once per tile for both products; dz added across column blocks in column order
  (semaphores, deterministic) or by atomics.
Variants (`Variant`, presets in VARIANTS; the default is the form timed on the H100): logits in
log2 units with exp2, masks only on the tiles that need them, a resident Z row tile, grouped
program order and wider autotune configs for the forward; the one-pass backward; 3xTF32 for fp32
"highest". Each is a constexpr flag of the same kernels, so every variant shares the
code it does not change.
Split counts come from rcl_kernels.planner (shared with the cuda backend), which keeps the
partial buffers under its workspace budget.

Numerics: products accumulate in fp32 (tl.dot with an fp32 accumulator). fp32 inputs multiply on
TF32 tensor cores only when allow_tf32, with both operands rounded to nearest TF32 first (the
tensor cores would truncate them); otherwise with FMA, or as 3xTF32 (Variant.fp32_highest).
LSE and softmax in fp32; exp is only ever taken of t − (running max) or t − lse.
dz and dk are returned in float32 (the caller rounds once, after adding its own terms).
P is cast to the input dtype for the second product, as flash attention does; for dk the row
weights g are first divided by max|g| so that g·p stays in [−1, 1] (fp16 would otherwise underflow
for the tiny g of a mean over many anchors) and max|g| is multiplied back in fp32.
NaN propagation does not rely on tl.max/tl.maximum (which may drop NaN on the GPU): a NaN logit
makes its exp NaN, so the running sumexp and hence lse become NaN whatever the running max does.

Tiling and tuning: rows are read with any stride but d with unit stride (a view with another
feature stride is copied once); offsets of a row or split (row · stride, which passes 2^31 at
N = 2^21 anchors) are 64-bit, offsets inside a tile 32-bit. On the GPU each kernel autotunes
over a few configs (chosen from ptxas register/spill reports for sm_90, bench/triton_sass.py;
bench/triton_configs.py times each) keyed on d, the dtypes, the product precision, the variant's
flags and power-of-two buckets of N and M; RCL_KERNELS_TRITON_AUTOTUNE=0 (read at import) keeps
the first config only. Under the interpreter
one small fixed config is used so that tests exercise several tiles, d chunks and splits.

The module imports without Triton; `unavailable_reason` says why the kernels cannot run.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

try:  # Triton is optional: the package must import on machines without it.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = (
        f"triton is not installed or failed to import ({type(exc).__name__}: {exc})")

from . import planner

# The package's one reading of TRITON_INTERPRET. triton.jit decides at decoration time whether a
# kernel is interpreted, so this is the mode the kernels below were built in (setting
# TRITON_INTERPRET later does not change them; unavailable_reason says so).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["INTERPRETED", "VARIANTS", "Variant", "backward_kernels", "chunk_meta",
           "config_label", "kernel_builds", "kernel_configs", "lse_backward", "lse_forward",
           "unavailable_reason", "variant_meta"]


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device`, otherwise a human-readable reason."""
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRETED:
            return (
                "rcl_kernels.triton_lse was imported with TRITON_INTERPRET=1, so its kernels run "
                "only on CPU tensors"
            )
        if not torch.cuda.is_available():
            return "torch reports no usable CUDA device"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.version.hip is None and torch.cuda.get_device_capability(index) < (8, 0):
            # bf16 tensor-core dots and the tuned tile sizes assume Ampere or newer.
            return "the Triton kernels need a CUDA device of compute capability 8.0 or newer"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (
                "TRITON_INTERPRET=1 was set after rcl_kernels.triton_lse was imported; set it "
                "before the import to run the kernels on the CPU"
            )
        return ("no CUDA device and TRITON_INTERPRET is not set (Triton runs on the CPU only "
                "interpreted)")
    return f"the Triton kernels do not support device type {device.type!r}"


@dataclass(frozen=True)
class Variant:
    """A selectable form of the kernels. Variant() is the form timed on the H100
    (gpu-runs/2026-11-26-h100.md); every other value is untimed until bench/triton_configs.py has
    run on a GPU, so nothing selects one by default. Every variant computes the same op and meets
    the same tolerances (tests/test_triton_lse.py)."""

    # Logits in log2 units: scale·log2(e) folded into one multiply, biases pre-scaled, exp2.
    exp2: bool = False
    # Mask only the tiles that need it (the diagonal band of the self mask, partial tiles) and
    # drop the masks of full tiles (EVEN_M / EVEN_N / EVEN_D specializations).
    lean_masks: bool = False
    # Forward: load the [BLOCK_M, d] row tile of Z once and keep it across the column loop
    # (d ≤ 256; larger d streams it as the default does).
    resident_z: bool = False
    # Forward: programs in groups of this many row blocks across every column split (a swizzle
    # for L2 reuse of Z tiles); 1 = row blocks fastest, as launched. With one column split (large
    # N) the order is the same either way: every program streams all of K.
    group_m: int = 1
    # Forward: autotune also over 128-wide tiles with 8 warps and 3-4 stages.
    wide_configs: bool = False
    # Backward: "two_pass" (dz and dk kernels, each recomputes S) or "one_pass" (S once per tile,
    # dk in registers, dz added across column blocks; for tensor-core products up to d = 256
    # (bf16/fp16) or 128 (TF32): fp32 FMA, 3xTF32 and larger d run two passes).
    backward: str = "two_pass"
    # one_pass: dz added in a fixed order (True: bitwise reproducible) or by fp32 atomics.
    deterministic: bool = True
    # fp32 without TF32 ("highest"): "ieee" (FMA products) or "tf32x3" (3xTF32: each operand as
    # a sum of two TF32 parts, three tensor-core products).
    fp32_highest: str = "ieee"

    def __post_init__(self):
        for name in ("exp2", "lean_masks", "resident_z", "wide_configs", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Variant.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.group_m, bool) or not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"Variant.group_m must be an int >= 1, got {self.group_m!r}")
        if self.fp32_highest not in ("ieee", "tf32x3"):
            raise ValueError(f"Variant.fp32_highest must be 'ieee' or 'tf32x3', got "
                             f"{self.fp32_highest!r}")
        if self.backward not in ("two_pass", "one_pass"):
            raise ValueError(f"Variant.backward must be 'two_pass' or 'one_pass', got "
                             f"{self.backward!r}")

    @staticmethod
    def of(variant: "Variant | str") -> "Variant":
        """A Variant, or the preset of that name in VARIANTS."""
        if isinstance(variant, Variant):
            return variant
        if isinstance(variant, str) and variant in VARIANTS:
            return VARIANTS[variant]
        raise ValueError(f"variant must be a Variant or one of {sorted(VARIANTS)}, got {variant!r}")


_FORWARD_ALL = dict(exp2=True, lean_masks=True, resident_z=True, wide_configs=True)
# Named presets, a ladder from the timed kernels to every forward flag: bench/triton_configs.py
# times each, so one GPU run shows what every step buys.
VARIANTS: dict[str, Variant] = {
    "default": Variant(),
    "exp2": Variant(exp2=True),
    "exp2-lean": Variant(exp2=True, lean_masks=True),
    "exp2-lean-resident": Variant(exp2=True, lean_masks=True, resident_z=True),
    "forward-all": Variant(**_FORWARD_ALL),
    "forward-all-grouped": Variant(**_FORWARD_ALL, group_m=8),
    "one-pass": Variant(**_FORWARD_ALL, backward="one_pass"),
    "one-pass-atomic": Variant(**_FORWARD_ALL, backward="one_pass", deterministic=False),
    "3xtf32": Variant(fp32_highest="tf32x3"),
}


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:
    # Kernels take the interpreter's paths where it differs from the GPU: it multiplies bf16 tiles
    # as their raw uint16 storage (upcast them, exactly), truncates fp32 -> bf16 casts and cannot
    # run inline PTX.
    _INTERP = tl.constexpr(INTERPRETED)

    @triton.jit
    def _round_tf32(x):
        """fp32 -> TF32 (10 mantissa bits, kept in fp32): round to nearest, ties away from zero.

        Tensor cores read only the top 19 bits of an fp32 operand, i.e. they truncate, which
        biases every product towards zero (measured: a 4e-5 loss error where cuBLAS, which rounds,
        gives 2e-7). cvt.rna.tf32.f32 is the rounding of wmma::__float_to_tf32 (the cuda backend)
        and the only f32->tf32 conversion sm_80 has. The interpreter cannot run PTX, so it does
        the same on the bits: inf and NaN pass unchanged, a finite value past the largest TF32
        rounds to inf."""
        if _INTERP:
            bits = x.to(tl.uint32, bitcast=True)
            special = (bits & 0x7F800000) == 0x7F800000
            rounded = (bits + 0x1000) & 0xFFFFE000
            return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)
        else:
            return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)

    # Offsets that multiply a row index by a row length can pass 2^31 (N up to 2^21 anchors times
    # d, and split partials [splits, N, d]): they are formed in 64 bits, once per tile; offsets
    # inside a tile stay 32-bit (the host keeps a row stride times a tile height below 2^31).
    @triton.jit
    def _row_offset(row, stride):
        """row · stride in 64 bits."""
        return tl.cast(row, tl.int64) * stride

    @triton.jit
    def _split_offset(split, rows, row, width):
        """(split · rows + row) · width in 64 bits: element offset of `row` in split partial
        `split` of a [splits, rows, width] buffer."""
        return (tl.cast(split, tl.int64) * rows + row) * width

    @triton.jit
    def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr):
        """acc + a @ b with an fp32 accumulator.

        "tf32x3" (3xTF32): a = a_hi + a_lo with both parts TF32 (a − a_hi is exact in fp32, and
        rounding it drops bits of order 2^-22·|a|), likewise b, and a·b ≈ a_lo·b_hi + a_hi·b_lo
        + a_hi·b_hi on TF32 tensor cores, small terms first; a_lo·b_lo (2^-22 relative) is
        dropped. Triton's own input_precision="tf32x3" does the same on the GPU, but the
        interpreter ignores input_precision (its products are plain fp32), so the split is
        written out here and the interpreter runs the GPU's algebra."""
        if _INTERP:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if INPUT_PRECISION == "tf32":
            return tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="tf32")
        elif INPUT_PRECISION == "tf32x3":
            a_hi = _round_tf32(a)
            b_hi = _round_tf32(b)
            a_lo = _round_tf32(a - a_hi)
            b_lo = _round_tf32(b - b_hi)
            acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
            return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        """x.to(dtype) with round-to-nearest-even. The interpreter truncates fp32 -> bf16 (a
        systematic bias of ~2^-9), so there the rounding is done on the bits first; the GPU cast
        already rounds to nearest even."""
        if _INTERP:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _exp(x, EXP2: tl.constexpr):
        """e^x, or 2^x when the logits are kept in log2 units (EXP2)."""
        if EXP2:
            return tl.exp2(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _load_tile(ptr, stride, mask_r, col0, ncols, ROWS: tl.constexpr, COLS: tl.constexpr,
                   EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
        """Columns [col0, col0 + COLS) of ROWS rows of a row-major matrix (unit column stride)
        whose first row is at `ptr`; rows outside mask_r and columns ≥ ncols read 0.
        EVEN_R / EVEN_C: that mask is known to be all true."""
        offs_c = col0 + tl.arange(0, COLS)
        ptrs = ptr + tl.arange(0, ROWS)[:, None] * stride + offs_c[None, :]
        mask_c = offs_c < ncols
        if EVEN_R and EVEN_C:
            return tl.load(ptrs)
        elif EVEN_R:
            return tl.load(ptrs, mask=mask_c[None, :], other=0.0)
        elif EVEN_C:
            return tl.load(ptrs, mask=mask_r[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)

    @triton.jit
    def _labels_and_bias(lab_ptr, bias_ptr, offs, mask, EVEN: tl.constexpr, EXP2: tl.constexpr):
        """Labels (−1 outside `mask`) and biases (0 outside) of a block of rows or columns; the
        biases in log2 units when EXP2."""
        if EVEN:
            lab = tl.load(lab_ptr + offs)
            bias = tl.load(bias_ptr + offs)
        else:
            lab = tl.load(lab_ptr + offs, mask=mask, other=-1)
            bias = tl.load(bias_ptr + offs, mask=mask, other=0.0)
        if EXP2:
            bias = bias * 1.4426950408889634  # log2(e)
        return lab, bias

    @triton.jit
    def _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                     EVEN_D: tl.constexpr):
        """<z_i, k_j> for a [BLOCK_M, BLOCK_N] tile, fp32 accumulation over d in BLOCK_K chunks.

        z_blk / k_blk point at the tile's first row / column (64-bit scalar offsets: N·d can pass
        2^31); offsets inside the tile stay 32-bit and d is unit-stride, which keeps the address
        arithmetic small and the loads vectorized."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = _load_tile(z_blk, stride_zm, mask_m, k0, D, BLOCK_M, BLOCK_K, EVEN_M, EVEN_D)
            b = _load_tile(k_blk, stride_km, mask_n, k0, D, BLOCK_N, BLOCK_K, EVEN_N, EVEN_D)
            acc = _mma(a, tl.trans(b), acc, INPUT_PRECISION)
        return acc

    @triton.jit
    def _on_band(row0, col0, self_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Whether the tile of rows [row0, row0 + BLOCK_M) and columns [col0, col0 + BLOCK_N)
        holds a self column (j = i + self_offset)."""
        diag = row0 + self_offset
        return (col0 < diag + BLOCK_M) & (col0 + BLOCK_N > diag)

    @triton.jit
    def _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b, col_lab, col_b,
                     self_offset, needs_mask, LEAN_MASKS: tl.constexpr,
                     TRANSPOSED: tl.constexpr = False):
        """Biased logits of a tile (qscale and the biases in the kernel's log units), −inf for the
        self column and for columns outside mask_n.

        Default: every tile is masked, rows outside mask_m too. LEAN_MASKS: only a tile with
        `needs_mask` (a self column or a partial column block) is; rows past N need no mask,
        since they are never stored and their p is 0 in the backward (lse = +inf, g = 0).
        TRANSPOSED: `dots` is the [columns, rows] tile (and so is t)."""
        if TRANSPOSED:
            r_lab, r_b, r_offs, r_mask = (row_lab[None, :], row_b[None, :], offs_m[None, :],
                                          mask_m[None, :])
            c_lab, c_b, c_offs, c_mask = (col_lab[:, None], col_b[:, None], offs_n[:, None],
                                          mask_n[:, None])
        else:
            r_lab, r_b, r_offs, r_mask = (row_lab[:, None], row_b[:, None], offs_m[:, None],
                                          mask_m[:, None])
            c_lab, c_b, c_offs, c_mask = (col_lab[None, :], col_b[None, :], offs_n[None, :],
                                          mask_n[None, :])
        # Labels compare in the dtype they come in: 32-bit when the caller passes int32 labels,
        # 64-bit (two compares per logit) for int64 ones. The kernels cannot narrow int64 labels
        # themselves: equal low words do not make equal labels; a caller that knows the labels'
        # range passes int32 (the loss does: class indices in [0, num_classes)).
        same = r_lab == c_lab
        t = dots * qscale + tl.where(same, r_b, c_b)
        # where (not an additive mask): a +inf bias on the masked self column must not leak.
        if LEAN_MASKS:
            if needs_mask:
                t = tl.where(c_mask & (c_offs != r_offs + self_offset), t, float("-inf"))
        else:
            t = tl.where(r_mask & c_mask & (c_offs != r_offs + self_offset), t, float("-inf"))
        return t

    @triton.jit
    def _finish_lse(m, s, EXP2: tl.constexpr):
        """max + log(sumexp) in natural units; −inf for rows that saw no column (m = −inf, s = 0).

        A NaN logit leaves s = NaN while m may be −inf (the max can drop NaN), so the dead-row
        test must look at s too, and log must see the NaN (log(1) only replaces s = 0)."""
        dead = (m == float("-inf")) & (s == 0.0)
        if EXP2:
            m = m * 0.6931471805599453  # ln(2): m was in log2 units
        return tl.where(dead, float("-inf"), m + tl.log(tl.where(s == 0.0, 1.0, s)))

    @triton.jit
    def _program_order(pid_m, pid_s, num_row_blocks, num_splits, GROUP_M: tl.constexpr):
        """(row block, split) of a program of the (row blocks, splits) grid. GROUP_M = 1: as
        launched (row blocks fastest). GROUP_M > 1: programs in launch order cover GROUP_M row
        blocks across every split before moving on, so a Z tile is reused from L2."""
        if GROUP_M == 1:
            return pid_m, pid_s
        else:
            pid = pid_s * num_row_blocks + pid_m
            width = GROUP_M * num_splits
            first = (pid // width) * GROUP_M
            rows = tl.minimum(num_row_blocks - first, GROUP_M)
            return first + (pid % width) % rows, (pid % width) // rows

    @triton.jit
    def _fwd_kernel(z_ptr, k_ptr, row_lab_ptr, col_lab_ptr, row_bias_ptr, col_bias_ptr,
                    lse_ptr, mpart_ptr, spart_ptr,
                    N, M, D, cols_per_split, self_offset, scale, stride_zm, stride_km,
                    N_KEY, M_KEY,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, WRITE_LSE: tl.constexpr,
                    EXP2: tl.constexpr, LEAN_MASKS: tl.constexpr, RESIDENT_Z: tl.constexpr,
                    GROUP_M: tl.constexpr, D_PAD: tl.constexpr, EVEN_M: tl.constexpr,
                    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
        pid_m, pid_s = _program_order(tl.program_id(0), tl.program_id(1), tl.num_programs(0),
                                      tl.num_programs(1), GROUP_M)
        row0 = pid_m * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        row_lab, row_b = _labels_and_bias(row_lab_ptr, row_bias_ptr, offs_m, mask_m, EVEN_M, EXP2)
        qscale = scale
        if EXP2:
            qscale = scale * 1.4426950408889634  # one multiply turns a dot into log2 units
        z_blk = z_ptr + _row_offset(row0, stride_zm)
        if RESIDENT_Z:  # the whole [BLOCK_M, d] row tile, loaded once for every column tile
            z_res = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, D_PAD, EVEN_M, EVEN_D)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        col_start = pid_s * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, M)
        # flatten: the column loop and the d loop of _scores_tile become one software-pipelined
        # loop, so the copies of the next column tile's first chunks overlap this tile's softmax
        # (nested, the d loop's pipeline drains and restarts on every column tile).
        for n0 in tl.range(col_start, col_end, BLOCK_N, flatten=True):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < col_end
            k_blk = k_ptr + _row_offset(n0, stride_km)
            if RESIDENT_Z:
                k_t = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, D_PAD, EVEN_N, EVEN_D)
                dots = _mma(z_res, tl.trans(k_t), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                            INPUT_PRECISION)
            else:
                dots = _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, EVEN_M, EVEN_N,
                                    EVEN_D)
            col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n, EVEN_N,
                                              EXP2)
            needs_mask = _on_band(row0, n0, self_offset, BLOCK_M, BLOCK_N)
            if not EVEN_N:
                needs_mask = needs_mask | (n0 + BLOCK_N > col_end)
            t = _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                             col_lab, col_b, self_offset, needs_mask, LEAN_MASKS)
            m_new = tl.maximum(m_i, tl.max(t, axis=1))
            # Shift by 0 while a row has seen only −inf: exp(−inf − (−inf)) would be NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * _exp(m_i - m_safe, EXP2) + tl.sum(_exp(t - m_safe[:, None], EXP2), axis=1)
            m_i = m_new

        if WRITE_LSE:
            tl.store(lse_ptr + offs_m, _finish_lse(m_i, s_i, EXP2), mask=mask_m)
        else:
            if EXP2:
                m_i = m_i * 0.6931471805599453  # partials in natural units for the merge
            part = _split_offset(pid_s, N, row0, 1) + tl.arange(0, BLOCK_M)
            tl.store(mpart_ptr + part, m_i, mask=mask_m)
            tl.store(spart_ptr + part, s_i, mask=mask_m)

    @triton.jit
    def _merge_kernel(mpart_ptr, spart_ptr, lse_ptr, N, NUM_SPLITS, BLOCK: tl.constexpr):
        """lse = log Σ_s sumexp_s · exp(max_s − max) + max over the column splits."""
        row0 = tl.program_id(0) * BLOCK
        offs = row0 + tl.arange(0, BLOCK)
        mask = offs < N
        m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            part = _split_offset(sp, N, row0, 1) + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.load(mpart_ptr + part, mask=mask, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for sp in range(0, NUM_SPLITS):
            part = _split_offset(sp, N, row0, 1) + tl.arange(0, BLOCK)
            mp = tl.load(mpart_ptr + part, mask=mask, other=float("-inf"))
            sp_ = tl.load(spart_ptr + part, mask=mask, other=0.0)
            # A NaN partial has a NaN sumexp (see the module docstring), so NaN survives here.
            s += sp_ * tl.exp(mp - m_safe)
        tl.store(lse_ptr + offs, _finish_lse(m, s, False), mask=mask)

    @triton.jit
    def _row_softmax_shift(lse_ptr, offs_m, mask_m, EXP2: tl.constexpr):
        """lse of a block of rows in the kernel's log units, as the shift that turns t into
        log p; +inf for rows without columns (lse = −inf: p = 0) and rows outside mask_m."""
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        if EXP2:
            lse = lse * 1.4426950408889634
        return lse

    @triton.jit
    def _dz_kernel(z_ptr, k_ptr, row_lab_ptr, col_lab_ptr, row_bias_ptr, col_bias_ptr,
                   lse_ptr, g_ptr, out_ptr,
                   N, M, D, cols_per_split, self_offset, scale, stride_zm, stride_km,
                   N_KEY, M_KEY,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   EXP2: tl.constexpr, LEAN_MASKS: tl.constexpr, ONE_CHUNK: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
        """dz (or its column-split partial) for one (row block, d chunk): scale·g_i·Σ_j p_ij k_j.

        ONE_CHUNK (chunk_meta: d ≤ BLOCK_D, tensor-core products): the Z row tile is loaded once,
        and each [BLOCK_N, d] K tile once, by the pipelined column loop, for both S = Z·Kᵀ and
        P·K. Otherwise S needs all of d and P·K one chunk of it, so the K chunk is a second load:
        the flattened loop pipelines the chunks of S across column tiles (async copies), while
        what the tile's prologue and epilogue load are plain loads. The column labels and biases
        are loaded in the prologue, so the S products cover their latency (as dk's row vectors);
        the K chunk first thing in the epilogue, where its first use, the store into the shared
        buffer of P·K's operand, comes after the tile's logits and exp. Loaded in the prologue
        instead, that store follows the load at once (sm_90: no product in between) and the
        tile stays live across the S loop (fp32: kilobytes of spills)."""
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        row0 = pid_m * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        row_lab, row_b = _labels_and_bias(row_lab_ptr, row_bias_ptr, offs_m, mask_m, EVEN_M, EXP2)
        qscale = scale
        if EXP2:
            qscale = scale * 1.4426950408889634
        lse = _row_softmax_shift(lse_ptr, offs_m, mask_m, EXP2)
        g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
        d0 = pid_d * BLOCK_D
        z_blk = z_ptr + _row_offset(row0, stride_zm)
        if ONE_CHUNK:
            z_res = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        col_start = pid_s * cols_per_split
        col_end = tl.minimum(col_start + cols_per_split, M)
        for n0 in tl.range(col_start, col_end, BLOCK_N, flatten=True):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < col_end
            k_blk = k_ptr + _row_offset(n0, stride_km)
            if ONE_CHUNK:
                kv = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
                dots = _mma(z_res, tl.trans(kv), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                            INPUT_PRECISION)
                col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n,
                                                  EVEN_N, EXP2)
            else:
                col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n,
                                                  EVEN_N, EXP2)
                dots = _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, EVEN_M, EVEN_N,
                                    EVEN_D)
                kv = _load_tile(k_blk, stride_km, mask_n, d0, D, BLOCK_N, BLOCK_D, False, False)
            needs_mask = _on_band(row0, n0, self_offset, BLOCK_M, BLOCK_N)
            if not EVEN_N:
                needs_mask = needs_mask | (n0 + BLOCK_N > col_end)
            t = _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                             col_lab, col_b, self_offset, needs_mask, LEAN_MASKS)
            p = _exp(t - lse[:, None], EXP2)  # in [0, 1]: safe to cast to bf16/fp16
            acc = _mma(_cast(p, kv.dtype), kv, acc, INPUT_PRECISION)

        # g is constant along the row, so it is applied once here in fp32.
        acc = acc * (g * scale)[:, None]
        out_blk = out_ptr + _split_offset(pid_s, N, row0, D)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_blk + tl.arange(0, BLOCK_M)[:, None] * D + offs_d[None, :], acc,
                 mask=mask_m[:, None] & (offs_d < D)[None, :])

    @triton.jit
    def _dk_kernel(z_ptr, k_ptr, row_lab_ptr, col_lab_ptr, row_bias_ptr, col_bias_ptr,
                   lse_ptr, g_ptr, gmax_ptr, out_ptr,
                   N, M, D, rows_per_split, self_offset, scale, stride_zm, stride_km,
                   N_KEY, M_KEY,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   EXP2: tl.constexpr, LEAN_MASKS: tl.constexpr, ONE_CHUNK: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
        """dk (or its row-split partial) for one (column block, d chunk): scale·Σ_i g_i p_ij z_i.

        The loads as in _dz_kernel, Z and K swapped: ONE_CHUNK (chunk_meta) loads each Z tile
        once for both products. It takes the tile transposed, Sᵀ = K·Zᵀ, with the resident K tile
        as the left operand, so that (g ⊙ P)ᵀ is already the left operand of dk += (g ⊙ P)ᵀ·Z
        (no transpose through shared memory) and fewer registers stay live across the loop."""
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        col0 = pid_n * BLOCK_N
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n, EVEN_N, EXP2)
        qscale = scale
        if EXP2:
            qscale = scale * 1.4426950408889634
        d0 = pid_d * BLOCK_D
        k_blk = k_ptr + _row_offset(col0, stride_km)
        if ONE_CHUNK:
            k_res = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
        # Normalise g by max|g| so g·p lies in [−1, 1] before the cast to the input dtype.
        gmax = tl.load(gmax_ptr)
        ginv = 1.0 / tl.where(gmax > 0, gmax, 1.0)  # all-zero g (or NaN): no scaling

        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        row_start = pid_s * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, N)
        for m0 in tl.range(row_start, row_end, BLOCK_M, flatten=True):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < row_end
            row_lab, row_b = _labels_and_bias(row_lab_ptr, row_bias_ptr, offs_m, mask_m, EVEN_M,
                                              EXP2)
            lse = _row_softmax_shift(lse_ptr, offs_m, mask_m, EXP2)
            g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0) * ginv
            z_blk = z_ptr + _row_offset(m0, stride_zm)
            needs_mask = _on_band(m0, col0, self_offset, BLOCK_M, BLOCK_N)
            if not EVEN_N:
                needs_mask = needs_mask | (col0 + BLOCK_N > M)
            if ONE_CHUNK:
                zv = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
                dots_t = _mma(k_res, tl.trans(zv), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                              INPUT_PRECISION)
                t_t = _logits_tile(dots_t, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                                   col_lab, col_b, self_offset, needs_mask, LEAN_MASKS, True)
                w_t = _cast(_exp(t_t - lse[None, :], EXP2) * g[None, :], zv.dtype)
            else:
                dots = _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, EVEN_M, EVEN_N,
                                    EVEN_D)
                zv = _load_tile(z_blk, stride_zm, mask_m, d0, D, BLOCK_M, BLOCK_D, False, False)
                t = _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                                 col_lab, col_b, self_offset, needs_mask, LEAN_MASKS)
                w_t = tl.trans(_cast(_exp(t - lse[:, None], EXP2) * g[:, None], zv.dtype))
            acc = _mma(w_t, zv, acc, INPUT_PRECISION)

        acc = acc * (scale / ginv)
        out_blk = out_ptr + _split_offset(pid_s, M, col0, D)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_blk + tl.arange(0, BLOCK_N)[:, None] * D + offs_d[None, :], acc,
                 mask=mask_n[:, None] & (offs_d < D)[None, :])

    @triton.jit
    def _wait_turn(lock, turn):
        """0 once column block `turn` may add to the rows of `lock`, run by every thread of the
        program: on the GPU each thread spins (an acquire load at GPU scope, so the stores
        released with the turn are visible to it) until *lock counts turn·(threads per program)
        releases, one per thread of each earlier block (_pass_turn).

        The spin is a PTX loop inside one elementwise op, and the hand-over has no barrier: the
        main loop around it then has neither a nested loop nor a gpu.barrier, so Triton still
        software-pipelines it. The interpreter runs programs one by one in ticket order, where
        the turn has always come (and one release stands for the program)."""
        if _INTERP:
            seen = tl.atomic_cas(lock, turn, turn)
            while seen != turn:
                seen = tl.atomic_cas(lock, turn, turn)
            return seen - turn
        else:
            return tl.inline_asm_elementwise(
                """{
                .reg .pred rcl_wait;
                .reg .u32 rcl_want;
                mov.u32 rcl_want, %ntid.x;
                mul.lo.u32 rcl_want, rcl_want, $2;
                RCL_WAIT_TURN:
                ld.global.acquire.gpu.b32 $0, [$1];
                setp.ne.u32 rcl_wait, $0, rcl_want;
                @rcl_wait nanosleep.u32 32;
                @rcl_wait bra RCL_WAIT_TURN;
                sub.u32 $0, $0, rcl_want;
                }""",
                "=r,l,r", [lock, turn], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pass_turn(lock):
        """Pass the turn on: every thread of the program adds 1 to *lock with release semantics
        at GPU scope, after its own stores (the asm has side effects, so no store moves past
        it; no barrier, which would stop the pipelining)."""
        if _INTERP:
            tl.atomic_add(lock, 1, sem="release")
        else:
            tl.inline_asm_elementwise("red.release.gpu.global.add.u32 [$1], 1; mov.u32 $0, 0;",
                                      "=r,l", [lock], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _add_dz(dz_ptr, sem_ptr, m0, mask_m, D, contribution, col_block,
                BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, DETERMINISTIC: tl.constexpr):
        """dz[m0 : m0 + BLOCK_M] += contribution, from column block col_block of the one-pass
        kernel.

        DETERMINISTIC: the column blocks add in their order, 0, 1, 2, ..., as FlashAttention's
        deterministic backward does: sem[1 + row block] counts the releases of the blocks that
        have added, and block col_block waits for its turn (_wait_turn). Programs take their
        column block from a ticket (_bwd_kernel), so the blocks they wait for started before
        them and the wait ends whatever order the hardware starts programs in. The host zeroes
        the counters for every launch. Otherwise: unordered fp32 atomics."""
        offs_d = tl.arange(0, D_PAD)
        mask = mask_m[:, None] & (offs_d < D)[None, :]
        row0 = m0
        if DETERMINISTIC:
            lock = sem_ptr + 1 + m0 // BLOCK_M
            # row0 (= m0) depends on the wait's result, so nothing moves the loads below
            # before the wait.
            row0 += _wait_turn(lock, col_block)
        ptrs = (dz_ptr + _row_offset(row0, D) + tl.arange(0, BLOCK_M)[:, None] * D
                + offs_d[None, :])
        if DETERMINISTIC:
            # .cg: read through L2, where the previous block's stores are (L1 is not coherent).
            current = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(ptrs, current + contribution, mask=mask)
            _pass_turn(lock)
        else:
            tl.atomic_add(ptrs, contribution, mask=mask, sem="relaxed")

    @triton.jit
    def _bwd_kernel(z_ptr, k_ptr, row_lab_ptr, col_lab_ptr, row_bias_ptr, col_bias_ptr,
                    lse_ptr, g_ptr, gmax_ptr, dz_ptr, dk_ptr, sem_ptr,
                    N, M, D, rows_per_split, self_offset, scale, stride_zm, stride_km,
                    N_KEY, M_KEY,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    EXP2: tl.constexpr, LEAN_MASKS: tl.constexpr, DETERMINISTIC: tl.constexpr,
                    D_PAD: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                    EVEN_D: tl.constexpr):
        """One-pass backward (Variant.backward = "one_pass", d ≤ D_PAD ≤ 256): a program owns a
        column block and a row split. It keeps its K tile and dk (fp32) in registers, and for
        every row block computes S and P once and takes both products from them: dk += (g·P)ᵀZ,
        and dz[rows] += P·K (·g·scale), added across column blocks by _add_dz. 6 N·M·d flops
        instead of the two-pass kernels' 8 (each recomputes S)."""
        num_col_blocks = tl.cdiv(M, BLOCK_N)
        if DETERMINISTIC:
            # Work in ticket order (sem[0]): a program's column block comes from the order in
            # which programs start, not from program_id, so every block it waits for is already
            # running.
            ticket = tl.atomic_add(sem_ptr, 1, sem="relaxed")
        else:
            ticket = tl.program_id(0)
        pid_n = ticket % num_col_blocks
        pid_s = ticket // num_col_blocks
        col0 = pid_n * BLOCK_N
        offs_n = col0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n, EVEN_N, EXP2)
        qscale = scale
        if EXP2:
            qscale = scale * 1.4426950408889634
        k_res = _load_tile(k_ptr + _row_offset(col0, stride_km), stride_km, mask_n, 0, D, BLOCK_N,
                           D_PAD, EVEN_N, EVEN_D)
        # Normalise g by max|g| so g·p lies in [−1, 1] before the cast to the input dtype.
        gmax = tl.load(gmax_ptr)
        ginv = 1.0 / tl.where(gmax > 0, gmax, 1.0)

        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        row_start = pid_s * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, N)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < row_end
            row_lab, row_b = _labels_and_bias(row_lab_ptr, row_bias_ptr, offs_m, mask_m, EVEN_M,
                                              EXP2)
            lse = _row_softmax_shift(lse_ptr, offs_m, mask_m, EXP2)
            g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
            z_t = _load_tile(z_ptr + _row_offset(m0, stride_zm), stride_zm, mask_m, 0, D, BLOCK_M,
                             D_PAD, EVEN_M, EVEN_D)
            dots = _mma(z_t, tl.trans(k_res), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                        INPUT_PRECISION)
            needs_mask = _on_band(m0, col0, self_offset, BLOCK_M, BLOCK_N)
            if not EVEN_N:
                needs_mask = needs_mask | (col0 + BLOCK_N > M)
            t = _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                             col_lab, col_b, self_offset, needs_mask, LEAN_MASKS)
            p = _exp(t - lse[:, None], EXP2)  # in [0, 1]: safe to cast to bf16/fp16
            dz_part = _mma(_cast(p, k_res.dtype), k_res,
                           tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32), INPUT_PRECISION)
            w = p * (g * ginv)[:, None]
            dk = _mma(tl.trans(_cast(w, z_t.dtype)), z_t, dk, INPUT_PRECISION)
            _add_dz(dz_ptr, sem_ptr, m0, mask_m, D, dz_part * (g * scale)[:, None], pid_n,
                    BLOCK_M, D_PAD, DETERMINISTIC)

        dk = dk * (scale / ginv)
        offs_d = tl.arange(0, D_PAD)
        out = dk_ptr + _split_offset(pid_s, M, col0, D)
        tl.store(out + tl.arange(0, BLOCK_N)[:, None] * D + offs_d[None, :], dk,
                 mask=mask_n[:, None] & (offs_d < D)[None, :])

    # ---------------------------------------------------------------------------------------------
    # Configurations. Under the interpreter: one small fixed config (several tiles, several d chunks
    # even at test sizes, so the loops and masks are exercised). On the GPU: a small autotune set
    # keyed on d, the dtypes (added by the autotuner), the variant's flags and power-of-two buckets
    # of N and M. Tests and bench/triton_configs.py run every config explicitly (`config=`).
    # ---------------------------------------------------------------------------------------------
    _INTERP_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    _INTERP_ONE_PASS = dict(BLOCK_M=16, BLOCK_N=16)
    _INTERP_BLOCK_D_MAX = 64
    # Up to this d there is one d chunk (no recompute); larger d is split into chunks, each of
    # which recomputes the logits (bf16 d=1024: 4x the Z·Kᵀ work, but no N×M buffer and no
    # atomics). fp32 tiles take twice the registers/shared memory, so their chunks are narrower.
    _GPU_BLOCK_D_MAX = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 128}

    def _cfg(bm, bn, bk, warps, stages):
        return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                             num_warps=warps, num_stages=stages)

    # Chosen with ptxas resource reports for sm_90 (no GPU timing yet): every config below
    # compiles without large register spills for bf16/fp16/tf32.
    _FWD_CONFIGS = [
        _cfg(64, 64, 32, 8, 3),  # first: the one used when autotuning is off
        _cfg(64, 64, 64, 4, 3),
        _cfg(64, 128, 64, 8, 3),
        _cfg(128, 64, 64, 8, 3),
        _cfg(128, 128, 32, 8, 3),
    ]
    # Variant.wide_configs: 128-wide tiles with 8 warps and deeper pipelines. ptxas for
    # sm_90 (bench/results/triton-sass-*.txt): no spills for bf16/fp16/TF32; fp32 FMA spills
    # (kilobytes with a resident Z tile), and TF32 with a resident Z tile needs more shared
    # memory than an SM has for 128 x 128 and 64 x 128 x 4 stages: the autotuner drops what
    # fails to launch and times the rest.
    _FWD_WIDE_CONFIGS = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 64, 64, 8, 4),
        _cfg(64, 128, 64, 8, 4),
    ]
    # The backward also holds a [block, BLOCK_D] fp32 accumulator (BLOCK_D up to 256), so its
    # parallel block (BLOCK_M for dz, BLOCK_N for dk) is 32-64 and 8 warps share it.
    _DZ_CONFIGS = [
        _cfg(64, 64, 32, 8, 2),
        _cfg(64, 64, 64, 8, 2),
        _cfg(64, 32, 64, 8, 3),
        _cfg(64, 64, 32, 8, 1),
    ]
    _DK_CONFIGS = [
        _cfg(64, 64, 32, 8, 2),
        _cfg(64, 64, 64, 8, 2),
        _cfg(32, 64, 64, 8, 3),
        _cfg(64, 64, 32, 8, 1),
    ]

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
    _HEURISTICS = {
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
    _KERNELS = {
        name: (fn, triton.heuristics(_HEURISTICS[name])(fn))
        for name, fn in (("forward", _fwd_kernel), ("dz", _dz_kernel), ("dk", _dk_kernel),
                         ("one_pass", _bwd_kernel))
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
    _tune = os.environ.get("RCL_KERNELS_TRITON_AUTOTUNE", "1").strip().lower()
    # RCL_KERNELS_TRITON_AUTOTUNE=0 (quick CI runs): the first config only, no tuning.
    _TUNED_CONFIGS = 1 if _tune in ("0", "false", "off", "no") else None

    @functools.cache
    def _autotuned(name: str, configs: tuple) -> Callable:
        return triton.autotune(configs=list(configs[:_TUNED_CONFIGS]), key=_KEYS[name],
                               reset_to_zero=_RESET.get(name))(_KERNELS[name][1])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
# Split lengths are multiples of the largest BLOCK_M/BLOCK_N of any config, so only the last tile of
# a split is partial (interpreter: 16, so that small tests exercise the splits too). The planner
# counts a reduction in tiles of this length.
_SPLIT_ALIGN = 16 if INTERPRETED else 128
_NOMINAL_BLOCK = 64  # block size assumed when counting the programs of a grid
# Largest tile height of any config: a row stride times this must stay below 2^31 (in-tile offsets
# are 32-bit, see _row_offset).
_MAX_TILE_ROWS = 128
_MAX_SPLITS = {"forward": 64, "dz": 16, "dk": 16}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bucket(x: int) -> int:
    """Power-of-two bucket used as an autotune key (tuning once per size class, not per size)."""
    return 1 << max(0, int(x) - 1).bit_length()


def _alloc(shape, device, dtype) -> torch.Tensor:
    """Every output/partial buffer comes from here (tests replace it to poison buffers with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _splits(kernel: str, parallel_programs: int, reduce_len: int, partial_bytes_per_split: int,
            device: torch.device, forced: int | None = None) -> tuple[int, int]:
    """(length of each split, number of splits) of a reduction of `reduce_len` rows or columns.

    The count comes from the planner (or `forced`, tests only); the length is a multiple of
    _SPLIT_ALIGN, which can leave fewer splits than asked for."""
    if forced is None:
        forced = planner.reduction_splits(
            parallel_programs, _cdiv(reduce_len, _SPLIT_ALIGN), device=device,
            max_splits=_MAX_SPLITS[kernel], partial_bytes_per_split=partial_bytes_per_split)
    per = _cdiv(_cdiv(reduce_len, max(1, forced)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return per, max(1, _cdiv(reduce_len, per))


def _input_precision(dtype: torch.dtype, allow_tf32: bool, variant: Variant) -> str:
    """How the products take their operands: "tf32" (fp32 rounded to TF32), "tf32x3" (fp32 as a
    sum of two TF32 parts, three products: Variant.fp32_highest) or "ieee" (the input dtype
    as it is: tensor cores for bf16/fp16, FMA for fp32)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else variant.fp32_highest


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along d (vectorized loads) and a row stride that keeps in-tile offsets
    32-bit; rows may otherwise have any stride (a view is copied only when it breaks one)."""
    if (x.shape[1] > 1 and x.stride(1) != 1) or x.stride(0) * _MAX_TILE_ROWS >= 2**31:
        return x.contiguous()
    return x


def _common_args(z, k):
    n, m = z.shape[0], k.shape[0]
    return dict(stride_zm=z.stride(0), stride_km=k.stride(0), N_KEY=_bucket(n), M_KEY=_bucket(m))


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
    precision = _input_precision(dtype, allow_tf32, variant)
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
                     _input_precision(dtype, allow_tf32, variant))
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


def _launch(name, configs, grid, args, kwargs, config):
    """Run kernel `name`: one given triton.Config (tests, benchmarks), fixed small blocks when
    interpreted, or autotuned over `configs`."""
    if config is not None:
        _KERNELS[name][1][grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)
    elif INTERPRETED:
        _KERNELS[name][1][grid](*args, **kwargs, **_INTERP_META[name])
    else:
        _autotuned(name, tuple(configs))[grid](*args, **kwargs)


def _forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
             variant=Variant(), num_splits=None, config=None):
    n, d = z.shape
    m = k.shape[0]
    device = z.device
    lse = _alloc((n,), device, torch.float32)
    if n == 0:
        return lse
    if m == 0:
        return lse.fill_(float("-inf"))
    row_labels, col_labels = row_labels.contiguous(), col_labels.contiguous()
    z, k = _kernel_layout(z), _kernel_layout(k)
    row_bias, col_bias = row_bias.contiguous(), col_bias.contiguous()
    # Partials: a running max and a sum of exponentials per row and split.
    cols_per_split, num_splits = _splits("forward", _cdiv(n, _NOMINAL_BLOCK), m, 8 * n, device,
                                         num_splits)
    if num_splits > 1:
        mpart = _alloc((num_splits, n), device, torch.float32)
        spart = _alloc((num_splits, n), device, torch.float32)
    else:
        mpart = spart = lse  # unused (WRITE_LSE)
    grid = lambda meta: (_cdiv(n, meta["BLOCK_M"]), num_splits)  # noqa: E731
    _launch(
        "forward", kernel_configs("forward", variant, d), grid,
        (z, k, row_labels, col_labels, row_bias, col_bias, lse, mpart, spart,
         n, m, d, cols_per_split, int(self_offset), float(scale)),
        dict(**_common_args(z, k), INPUT_PRECISION=_input_precision(z.dtype, allow_tf32, variant),
             WRITE_LSE=num_splits == 1, **variant_meta("forward", variant, d)),
        config,
    )
    if num_splits > 1:
        block = 128
        _merge_kernel[(_cdiv(n, block),)](mpart, spart, lse, n, num_splits, BLOCK=block)
    return lse


@dataclass(frozen=True)
class _Backward:
    """The backward's inputs in kernel layout; each pass below launches one kernel on them (the
    benchmark times the passes one by one)."""

    g: torch.Tensor  # grad_lse in fp32
    z: torch.Tensor
    k: torch.Tensor
    row_labels: torch.Tensor
    col_labels: torch.Tensor
    row_bias: torch.Tensor
    col_bias: torch.Tensor
    lse: torch.Tensor
    self_offset: int
    scale: float
    allow_tf32: bool
    variant: Variant

    @staticmethod
    def of(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
           allow_tf32, variant) -> "_Backward":
        return _Backward(grad_lse.to(torch.float32).contiguous(), _kernel_layout(z),
                         _kernel_layout(k), row_labels.contiguous(), col_labels.contiguous(),
                         row_bias.contiguous(), col_bias.contiguous(), lse.contiguous(),
                         int(self_offset), float(scale), allow_tf32, Variant.of(variant))

    def kernel_args(self, *outputs) -> tuple:
        """Tensor arguments of the dz/dk/one-pass kernels: inputs, lse, g, then `outputs`."""
        return (self.z, self.k, self.row_labels, self.col_labels, self.row_bias, self.col_bias,
                self.lse, self.g, *outputs)

    def scalars(self, reduce_per_split: int) -> tuple:
        n, d = self.z.shape
        return (n, self.k.shape[0], d, reduce_per_split, self.self_offset, self.scale)

    def precision(self) -> str:
        return _input_precision(self.z.dtype, self.allow_tf32, self.variant)

    def meta(self, kernel: str) -> dict:
        return dict(**_common_args(self.z, self.k), **variant_meta(kernel, self.variant,
                                                                   self.z.shape[1]),
                    INPUT_PRECISION=self.precision())

    def gmax(self) -> torch.Tensor:
        """max |g|, by which the dk products divide g (see the module docstring)."""
        return self.g.abs().amax().reshape(1)


def _dz_pass(b: _Backward, splits=None, config=None) -> torch.Tensor:
    """dz: row-parallel; the columns split when row blocks x d chunks do not fill the GPU."""
    (n, d), m, device = b.z.shape, b.k.shape[0], b.z.device
    block_d = _block_d(d, b.z.dtype)
    d_chunks = _cdiv(d, block_d)
    cols_per_split, splits = _splits("dz", _cdiv(n, _NOMINAL_BLOCK) * d_chunks, m, 4 * n * d,
                                     device, splits)
    out = _alloc((splits, n, d), device, torch.float32)
    grid = lambda meta: (_cdiv(n, meta["BLOCK_M"]), d_chunks, splits)  # noqa: E731
    _launch("dz", kernel_configs("dz", b.variant, d), grid,
            (*b.kernel_args(out), *b.scalars(cols_per_split)),
            dict(b.meta("dz"), **chunk_meta("dz", d, b.z.dtype, b.precision())), config)
    # Fixed-order sum of the partials: deterministic.
    return out[0] if splits == 1 else out.sum(0)


def _dk_pass(b: _Backward, splits=None, config=None) -> torch.Tensor:
    """dk: column-parallel; the rows split when needed (M ≫ N is the usual case, so rarely)."""
    (n, d), m, device = b.z.shape, b.k.shape[0], b.z.device
    block_d = _block_d(d, b.z.dtype)
    d_chunks = _cdiv(d, block_d)
    rows_per_split, splits = _splits("dk", _cdiv(m, _NOMINAL_BLOCK) * d_chunks, n, 4 * m * d,
                                     device, splits)
    out = _alloc((splits, m, d), device, torch.float32)
    grid = lambda meta: (_cdiv(m, meta["BLOCK_N"]), d_chunks, splits)  # noqa: E731
    _launch("dk", kernel_configs("dk", b.variant, d), grid,
            (*b.kernel_args(b.gmax(), out), *b.scalars(rows_per_split)),
            dict(b.meta("dk"), **chunk_meta("dk", d, b.z.dtype, b.precision())), config)
    return out[0] if splits == 1 else out.sum(0)


def _one_pass_sems(n: int, device) -> torch.Tensor:
    """The deterministic one-pass kernel's counters, zeroed (every launch needs fresh ones, as
    the CUDA mma kernels' workspace): the ticket counter, then one turn counter per row block of
    the smallest BLOCK_M of any config (16)."""
    return torch.zeros((1 + _cdiv(n, 16),), device=device, dtype=torch.int32)


def _one_pass(b: _Backward, splits=None, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dz, dk by the one-pass kernel: dz accumulates in place (zeroed first), dk in the same
    row-split partials as the two-pass dk kernel."""
    (n, d), m, device = b.z.shape, b.k.shape[0], b.z.device
    rows_per_split, splits = _splits("dk", _cdiv(m, _NOMINAL_BLOCK), n, 4 * m * d, device,
                                     splits)
    dz = _alloc((n, d), device, torch.float32).zero_()
    dk_out = _alloc((splits, m, d), device, torch.float32)
    sem = _one_pass_sems(n, device)
    grid = lambda meta: (_cdiv(m, meta["BLOCK_N"]) * splits,)  # noqa: E731
    _launch("one_pass", kernel_configs("one_pass", b.variant, d), grid,
            (*b.kernel_args(b.gmax(), dz, dk_out, sem), *b.scalars(rows_per_split)),
            b.meta("one_pass"), config)
    return dz, (dk_out[0] if splits == 1 else dk_out.sum(0))


def _backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
              allow_tf32, variant=Variant(), dz_splits=None, dk_splits=None, dz_config=None,
              dk_config=None, one_pass_config=None):
    n, d = z.shape
    m = k.shape[0]
    if n == 0 or m == 0 or d == 0:
        return (torch.zeros((n, d), device=z.device, dtype=torch.float32),
                torch.zeros((m, d), device=z.device, dtype=torch.float32))
    b = _Backward.of(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse,
                     self_offset, scale, allow_tf32, variant)
    if backward_kernels(variant, d, z.dtype, allow_tf32) == ("one_pass",):
        return _one_pass(b, dk_splits, one_pass_config)
    return _dz_pass(b, dz_splits, dz_config), _dk_pass(b, dk_splits, dk_config)


def lse_forward(z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor,
                col_labels: torch.Tensor, row_bias: torch.Tensor, col_bias: torch.Tensor,
                self_offset: int, scale: float, allow_tf32: bool, *,
                variant: Variant | str = "default") -> torch.Tensor:
    """lse [N] float32 of the masked, biased logits (see the module docstring).

    The caller validates shapes, dtypes (float32, bfloat16, float16) and devices
    (rcl_kernels._ops). `variant`: a Variant or the name of one in VARIANTS."""
    return _forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                    allow_tf32, Variant.of(variant))


def lse_backward(grad_lse: torch.Tensor, z: torch.Tensor, k: torch.Tensor,
                 row_labels: torch.Tensor, col_labels: torch.Tensor, row_bias: torch.Tensor,
                 col_bias: torch.Tensor, lse: torch.Tensor, self_offset: int, scale: float,
                 allow_tf32: bool, *,
                 variant: Variant | str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(dz [N, d], dk [M, d]) in float32 for grad_lse [N] and the lse of lse_forward.

    The gradients stay in the accumulation dtype (csrc/ops.cpp): the caller adds the positive-term
    gradients before the single rounding to the input dtype."""
    return _backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                     scale, allow_tf32, Variant.of(variant))
