"""The one-pass backward (Variant.backward = "one_pass"; tensor-core products, d <= 256):
program = (column block, row split) with its K tile and dk in registers; the logits and P once
per tile for both products; dz added across column blocks in column order (a ticket and turn
counters: deterministic) or by fp32 atomics."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_helpers import (  # noqa: F401 (the kernels call them by name)
    _row_offset, _mma, _dots, _cast, _exp, _load_tile, _log_scale, _block, _tile_needs_mask,
    _logits_tile, _split_range, _row_vectors, _g_normaliser, _store_partial, _INTERP,
)


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
def _one_pass_kernel(z_ptr, k_ptr, row_lab_ptr, col_lab_ptr, row_bias_ptr, col_bias_ptr,
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
    offs_n, mask_n, col_lab, col_b = _block(col0, M, col_lab_ptr, col_bias_ptr, BLOCK_N, EVEN_N,
                                            EXP2)
    qscale = _log_scale(scale, EXP2)
    k_res = _load_tile(k_ptr + _row_offset(col0, stride_km), stride_km, mask_n, 0, D, BLOCK_N,
                       D_PAD, EVEN_N, EVEN_D)
    ginv = _g_normaliser(gmax_ptr)

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    row_start, row_end = _split_range(pid_s, rows_per_split, N)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m, mask_m, row_lab, row_b = _block(m0, row_end, row_lab_ptr, row_bias_ptr, BLOCK_M,
                                                EVEN_M, EXP2)
        lse, g = _row_vectors(lse_ptr, g_ptr, offs_m, mask_m, EXP2)
        z_t = _load_tile(z_ptr + _row_offset(m0, stride_zm), stride_zm, mask_m, 0, D, BLOCK_M,
                         D_PAD, EVEN_M, EVEN_D)
        dots = _dots(z_t, k_res, BLOCK_M, BLOCK_N, INPUT_PRECISION)
        needs_mask = _tile_needs_mask(m0, col0, M, self_offset, BLOCK_M, BLOCK_N, EVEN_N)
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
    _store_partial(dk_ptr, pid_s, M, col0, mask_n, 0, D, dk, BLOCK_N, D_PAD)
