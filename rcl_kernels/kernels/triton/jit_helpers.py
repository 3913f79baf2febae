"""The @triton.jit helpers every kernel of the Triton backend shares: operand rounding and
products, exp in either log unit, masked tile loads, the logits of a tile, 64-bit offsets and the
program order, and the set-up every kernel repeats (a block of rows or columns with its labels
and biases, the backward's row vectors (lse, g), a split's range, the logit scale, g's normaliser, the
store of an output partial). Kernels call them by name (triton.jit resolves a callee from the
caller's globals, so each kernel module imports the ones it uses). They inline: a kernel built
from them compiles to the same PTX instructions as one written out (only the line info, and with
it ptxas's register numbering and scheduling, can differ)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETED

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
def _log_scale(scale, EXP2: tl.constexpr):
    """The logit scale in the kernel's log units: one multiply turns a dot into log2 units
    when EXP2."""
    if EXP2:
        return scale * 1.4426950408889634
    else:
        return scale


@triton.jit
def _span(start, end, BLOCK: tl.constexpr):
    """Indices [start, start + BLOCK) of a block of rows or columns, and the mask of those
    below `end`."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < end


@triton.jit
def _block(start, end, lab_ptr, bias_ptr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
           EXP2: tl.constexpr):
    """_span's indices and mask of a block of rows or columns, and their labels and biases
    (_labels_and_bias)."""
    offs, mask = _span(start, end, BLOCK)
    lab, bias = _labels_and_bias(lab_ptr, bias_ptr, offs, mask, EVEN, EXP2)
    return offs, mask, lab, bias


@triton.jit
def _dots(a, b, ROWS: tl.constexpr, COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a · bᵀ [ROWS, COLS] in fp32, for whole-row tiles a [ROWS, d] and b [COLS, d]."""
    return _mma(a, tl.trans(b), tl.zeros([ROWS, COLS], dtype=tl.float32), INPUT_PRECISION)


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
def _tile_needs_mask(row0, col0, col_end, self_offset, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """Whether _logits_tile must mask the tile of rows [row0, row0 + BLOCK_M) and columns
    [col0, col0 + BLOCK_N) under LEAN_MASKS: it holds a self column (_on_band) or, unless
    EVEN_N, columns at or past col_end."""
    needs_mask = _on_band(row0, col0, self_offset, BLOCK_M, BLOCK_N)
    if not EVEN_N:
        needs_mask = needs_mask | (col0 + BLOCK_N > col_end)
    return needs_mask


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
def _split_range(split, per_split, total):
    """[start, end) of split `split` of an axis of `total` indices in splits of per_split."""
    start = split * per_split
    return start, tl.minimum(start + per_split, total)


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
def _row_vectors(lse_ptr, g_ptr, offs_m, mask_m, EXP2: tl.constexpr):
    """The backward's vectors of a block of rows: their softmax shift (_row_softmax_shift) and
    upstream gradients g (0 outside mask_m)."""
    lse = _row_softmax_shift(lse_ptr, offs_m, mask_m, EXP2)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
    return lse, g


@triton.jit
def _g_normaliser(gmax_ptr):
    """1 / max|g| (1 when g is all zero, or NaN), by which the dk products multiply g so that
    g·p lies in [−1, 1] before the cast to the input dtype."""
    gmax = tl.load(gmax_ptr)
    return 1.0 / tl.where(gmax > 0, gmax, 1.0)


@triton.jit
def _store_partial(out_ptr, split, rows, row0, mask, d0, D, acc, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """acc [BLOCK, BLOCK_D] into rows [row0, row0 + BLOCK) (those in mask) and columns
    [d0, d0 + BLOCK_D) (those below D) of split partial `split` of a [splits, rows, D] fp32
    buffer."""
    out_blk = out_ptr + _split_offset(split, rows, row0, D)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    tl.store(out_blk + tl.arange(0, BLOCK)[:, None] * D + offs_d[None, :], acc,
             mask=mask[:, None] & (offs_d < D)[None, :])
