"""How the GPU kernels (triton and cuda) split their work: one planner for both.

A streaming kernel runs one program per (parallel block, output chunk). When those alone cannot
fill the GPU (BCL: N = 512 anchors are 8 row blocks for 132 SMs), the reduction dimension (the
columns of the forward and dz passes, the rows of the dk pass) is cut into splits whose partial
results are combined in a fixed order afterwards: deterministic, no atomics. Splits cost a
workspace of partials, which is held under a byte budget so that memory stays O((N + M)·d).
"""

from __future__ import annotations

import functools

import torch

# Bytes of split partials a kernel may hold at once (issue 11: ≤ 64 MB above inputs and
# gradients at N = 32,768).
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
