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
    _row_offset, _mma, _dots, _cast, _exp, _load_tile, _labels_and_bias, _log_scale, _span,
    _block, _scores_tile, _tile_needs_mask, _logits_tile, _split_range, _row_vectors,
    _g_normaliser, _store_partial,
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
    offs_m, mask_m, row_lab, row_b = _block(row0, N, row_lab_ptr, row_bias_ptr, BLOCK_M, EVEN_M,
                                            EXP2)
    qscale = _log_scale(scale, EXP2)
    lse, g = _row_vectors(lse_ptr, g_ptr, offs_m, mask_m, EXP2)
    d0 = pid_d * BLOCK_D
    z_blk = z_ptr + _row_offset(row0, stride_zm)
    if ONE_CHUNK:
        z_res = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    col_start, col_end = _split_range(pid_s, cols_per_split, M)
    for n0 in tl.range(col_start, col_end, BLOCK_N, flatten=True):
        offs_n, mask_n = _span(n0, col_end, BLOCK_N)
        k_blk = k_ptr + _row_offset(n0, stride_km)
        if ONE_CHUNK:
            kv = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
            dots = _dots(z_res, kv, BLOCK_M, BLOCK_N, INPUT_PRECISION)
            col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n,
                                              EVEN_N, EXP2)
        else:
            col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n,
                                              EVEN_N, EXP2)
            dots = _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, EVEN_M, EVEN_N,
                                EVEN_D)
            kv = _load_tile(k_blk, stride_km, mask_n, d0, D, BLOCK_N, BLOCK_D, False, False)
        needs_mask = _tile_needs_mask(row0, n0, col_end, self_offset, BLOCK_M, BLOCK_N, EVEN_N)
        t = _logits_tile(dots, qscale, offs_m, offs_n, mask_m, mask_n, row_lab, row_b,
                         col_lab, col_b, self_offset, needs_mask, LEAN_MASKS)
        p = _exp(t - lse[:, None], EXP2)  # in [0, 1]: safe to cast to bf16/fp16
        acc = _mma(_cast(p, kv.dtype), kv, acc, INPUT_PRECISION)

    # g is constant along the row, so it is applied once here in fp32.
    acc = acc * (g * scale)[:, None]
    _store_partial(out_ptr, pid_s, N, row0, mask_m, d0, D, acc, BLOCK_M, BLOCK_D)


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
    offs_n, mask_n, col_lab, col_b = _block(col0, M, col_lab_ptr, col_bias_ptr, BLOCK_N, EVEN_N,
                                            EXP2)
    qscale = _log_scale(scale, EXP2)
    d0 = pid_d * BLOCK_D
    k_blk = k_ptr + _row_offset(col0, stride_km)
    if ONE_CHUNK:
        k_res = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, BLOCK_D, EVEN_N, EVEN_D)
    ginv = _g_normaliser(gmax_ptr)

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_start, row_end = _split_range(pid_s, rows_per_split, N)
    for m0 in tl.range(row_start, row_end, BLOCK_M, flatten=True):
        offs_m, mask_m, row_lab, row_b = _block(m0, row_end, row_lab_ptr, row_bias_ptr, BLOCK_M,
                                                EVEN_M, EXP2)
        lse, g = _row_vectors(lse_ptr, g_ptr, offs_m, mask_m, EXP2)
        g = g * ginv
        z_blk = z_ptr + _row_offset(m0, stride_zm)
        needs_mask = _tile_needs_mask(m0, col0, M, self_offset, BLOCK_M, BLOCK_N, EVEN_N)
        if ONE_CHUNK:
            zv = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, BLOCK_D, EVEN_M, EVEN_D)
            dots_t = _dots(k_res, zv, BLOCK_N, BLOCK_M, INPUT_PRECISION)
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
    _store_partial(out_ptr, pid_s, M, col0, mask_n, d0, D, acc, BLOCK_N, BLOCK_D)
