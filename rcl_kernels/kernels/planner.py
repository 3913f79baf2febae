"""How the kernels split their work: the splits of the streaming GPU kernels (triton and cuda, one
planner for both) and the row blocks of the tiled algorithm.

A streaming kernel runs one program per (parallel block, output chunk). When those alone cannot
fill the GPU (BCL: N = 512 anchors are 8 row blocks for 132 SMs), the reduction dimension (the
columns of the forward and dz passes, the rows of the dk pass) is cut into splits whose partial
results are combined in a fixed order afterwards: deterministic, no atomics. Splits cost a
workspace of partials, which is held under a byte budget so that memory stays O((N + M)·d).
"""

from __future__ import annotations

import functools

import torch

# Bytes of split partials a kernel may hold at once (the memory target: ≤ 64 MB above
# inputs and gradients at N = 32,768).
WORKSPACE_BUDGET_BYTES = 32 << 20
# Programs per SM the planner aims for: about two waves keeps every SM busy through the tail.
PROGRAMS_PER_SM = 2
# A split shorter than this many tiles spends more on its partial than on its work.
MIN_TILES_PER_SPLIT = 4
# Streaming multiprocessors assumed off the GPU (the Triton interpreter), so that tests at small
# sizes still exercise the split paths.
INTERPRETER_SM_COUNT = 2


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a fixed small number for CPU tensors)."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def reduction_splits(
    parallel_programs: int,
    reduce_tiles: int,
    *,
    device: torch.device,
    max_splits: int,
    partial_bytes_per_split: int = 0,
) -> int:
    """How many programs share one reduction of `reduce_tiles` tiles.

    parallel_programs: programs the grid has without splitting (blocks × output chunks).
    partial_bytes_per_split: workspace each extra split adds (0 when partials are tiny).
    """
    target = PROGRAMS_PER_SM * sm_count(device)
    if parallel_programs <= 0 or reduce_tiles <= 0 or parallel_programs >= target:
        return 1
    splits = min(
        -(-target // parallel_programs),
        reduce_tiles // MIN_TILES_PER_SPLIT,
        max_splits,
    )
    if partial_bytes_per_split > 0:
        splits = min(splits, WORKSPACE_BUDGET_BYTES // partial_bytes_per_split)
    return max(1, splits)


def tiled_block_rows(rows: int, columns: int, *, acc_bytes: int, operand_bytes: int) -> int:
    """Anchor rows per block of the tiled algorithm, for blocks of equal size: a block's scores
    (accumulation dtype) plus, when the GEMM operands are narrower, its probabilities take at most
    WORKSPACE_BUDGET_BYTES.

    Blocks are as large as that allows on either device. Each block ends with the dk GEMM over its
    rows (dk += Gᵀ·Z_block reads and writes all of dk [M, d]), and on the CPU with a barrier of the
    threads, which pull the block's panels of rows from a shared counter (a panel's scores stay in
    cache from their GEMM to its dz GEMM, so the block need not). BCL's N = 512, M = 1,512 is one
    block; N = 4,096, M = 5,096 in float32 three blocks of 1,366 rows.
    """
    per_row = max(1, columns * (acc_bytes + (operand_bytes if operand_bytes != acc_bytes else 0)))
    limit = WORKSPACE_BUDGET_BYTES // per_row
    block = max(1, min(rows, limit))
    blocks = -(-rows // block) if rows > 0 else 1
    return max(1, -(-rows // blocks))
