"""The forward pass: program = (row block, column split). Each program streams the column tiles
of its split with an online (max, sumexp) pair and writes lse, or its partial pair when the
columns are split; `_merge_kernel` merges the partials of every split (launch.forward)."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_helpers import (  # noqa: F401 (the kernels call them by name)
    _row_offset, _split_offset, _dots, _exp, _load_tile, _labels_and_bias, _log_scale, _span,
    _block, _scores_tile, _tile_needs_mask, _logits_tile, _finish_lse, _program_order,
    _split_range,
)


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
    offs_m, mask_m, row_lab, row_b = _block(row0, N, row_lab_ptr, row_bias_ptr, BLOCK_M, EVEN_M,
                                            EXP2)
    qscale = _log_scale(scale, EXP2)
    z_blk = z_ptr + _row_offset(row0, stride_zm)
    if RESIDENT_Z:  # the whole [BLOCK_M, d] row tile, loaded once for every column tile
        z_res = _load_tile(z_blk, stride_zm, mask_m, 0, D, BLOCK_M, D_PAD, EVEN_M, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    col_start, col_end = _split_range(pid_s, cols_per_split, M)
    # flatten: the column loop and the d loop of _scores_tile become one software-pipelined
    # loop, so the copies of the next column tile's first chunks overlap this tile's softmax
    # (nested, the d loop's pipeline drains and restarts on every column tile).
    for n0 in tl.range(col_start, col_end, BLOCK_N, flatten=True):
        offs_n, mask_n = _span(n0, col_end, BLOCK_N)
        k_blk = k_ptr + _row_offset(n0, stride_km)
        if RESIDENT_Z:
            k_t = _load_tile(k_blk, stride_km, mask_n, 0, D, BLOCK_N, D_PAD, EVEN_N, EVEN_D)
            dots = _dots(z_res, k_t, BLOCK_M, BLOCK_N, INPUT_PRECISION)
        else:
            dots = _scores_tile(z_blk, k_blk, mask_m, mask_n, D, stride_zm, stride_km,
                                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, EVEN_M, EVEN_N,
                                EVEN_D)
        col_lab, col_b = _labels_and_bias(col_lab_ptr, col_bias_ptr, offs_n, mask_n, EVEN_N,
                                          EXP2)
        needs_mask = _tile_needs_mask(row0, n0, col_end, self_offset, BLOCK_M, BLOCK_N, EVEN_N)
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
