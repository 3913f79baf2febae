"""Row blocks of the tiled algorithm (rcl_kernels.kernels.planner.tiled_block_rows)."""

from __future__ import annotations

import pytest

from rcl_kernels.kernels import planner

CPU = dict(acc_bytes=4, operand_bytes=4)  # the CPU runs its GEMMs in the accumulation dtype


def test_bcl_shape_is_one_block_on_either_device():
    """BCL's shape (N = 512 anchors, M = 1,512 columns): one block, so the dk GEMM runs once with
    all 512 rows as its inner dimension instead of twice with 256."""
    for acc, operand in ((4, 4), (4, 2)):
        assert planner.tiled_block_rows(512, 1512, acc_bytes=acc, operand_bytes=operand) == 512
    assert planner.tiled_block_rows(512, 1512, **CPU) == 512


def test_blocks_are_as_large_as_the_workspace_budget_allows_and_equal():
    rows = planner.tiled_block_rows(4096, 5096, **CPU)
    assert rows * 5096 * 4 <= planner.WORKSPACE_BUDGET_BYTES
    assert -(-4096 // rows) == -(-4096 * 5096 * 4 // planner.WORKSPACE_BUDGET_BYTES)  # fewest blocks
    assert rows == 1366  # three blocks, the last one not thin


@pytest.mark.parametrize("columns", [lambda n: n + 1, lambda n: n + 1000, lambda n: 5 * n + 3,
                                     lambda n: 200_000])
def test_blocks_cover_the_rows_within_the_workspace_budget(columns):
    for n in range(0, 3000, 37):
        m = columns(n)
        rows = planner.tiled_block_rows(n, m, **CPU)
        assert 1 <= rows <= max(n, 1)
        blocks = -(-n // rows)
        assert blocks * rows - n < max(blocks, 1), (n, m, rows)  # equal blocks
        assert rows * m * 4 <= planner.WORKSPACE_BUDGET_BYTES or rows == 1
