"""The two-pass backward: `_dz_kernel` (program = row block, d-output chunk, column split;
dz_i = scale·g_i·Σ_j p_ij·k_j) and `_dk_kernel` (program = column block, d-output chunk, row
split; dk_j = scale·Σ_i g_i·p_ij·z_i). Each recomputes the logits from Z, K and lse. Both are
deterministic: every program owns its output tile, and the host sums split partials in a fixed
order. When the whole row is one d chunk (configs.chunk_meta), each streamed K (dz) or Z (dk)
tile is loaded once, by the pipelined loop, for both of the kernel's products."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_helpers import (  # noqa: F401 (the kernels call them by name)
    _row_offset,
    _split_offset,
    _mma,
    _cast,
    _exp,
    _load_tile,
    _labels_and_bias,
    _scores_tile,
    _on_band,
    _logits_tile,
    _row_softmax_shift,
)


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
