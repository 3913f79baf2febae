"""Each fused candidate's kernels behind one signature (`Kernels`): the op calls, with the split
counts and row blocks that rcl_kernels.planner plans for them. Which candidate runs is
rcl_kernels.backends' choice; a Triton variant reaches its op as an argument.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ops  # noqa: F401 (registers the torch.ops.rcl_kernels ops called here)
from . import planner


@dataclass(frozen=True)
class Kernels:
    """The LSE kernels of one backend and algorithm (math and argument contract: csrc/ops.cpp):
        forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32) -> lse
        backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                 scale, allow_tf32) -> (dz, dk)
        loss_forward_backward(weights, z, k, ..., self_offset, scale, allow_tf32)
                 -> (lse, positive_sum, dz, dk): in the forward's pass, the positives' score sums
                 Σ_{j∈Pos(i)} <z_i, k_j> and the gradient of the whole loss
                 Σ_i weights_i·(lse_i − mean_{j∈Pos(i)} t_ij) for per-anchor weights known up
                 front (None: the algorithm has none, as a streaming forward cannot know a row's
                 lse in time)
    """

    forward: Callable
    backward: Callable
    loss_forward_backward: Callable | None = None
    max_dim: int | None = None  # largest feature dimension the kernels take
    # The label dtype the loss passes (rcl_kernels.functional): int64, which every op takes, or
    # int32 for ops that also take it and then compare labels in 32 bits (the Triton ops).
    label_dtype: torch.dtype = torch.int64


def _cpu_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.cpu_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale
    )


def _cpu_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                  allow_tf32):
    return torch.ops.rcl_kernels.cpu_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale
    )


def _acc_bytes(z) -> int:
    """Bytes of one element of the accumulation dtype (float64 for float64 inputs, else float32)."""
    return 8 if z.dtype == torch.float64 else 4


def _tiled_block_rows(z, k) -> int:
    acc_bytes = _acc_bytes(z)
    # The CPU runs its GEMMs in the accumulation dtype.
    operand_bytes = acc_bytes if z.device.type == "cpu" else z.element_size()
    return planner.tiled_block_rows(z.shape[0], k.shape[0], acc_bytes=acc_bytes,
                                    operand_bytes=operand_bytes)


def _tiled_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.tiled_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, _tiled_block_rows(z, k)
    )


def _tiled_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                    allow_tf32):
    return torch.ops.rcl_kernels.tiled_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        _tiled_block_rows(z, k),
    )


def _tiled_loss_forward_backward(weights, z, k, row_labels, col_labels, row_bias, col_bias,
                                 self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.tiled_loss_forward_backward(
        weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
        _tiled_block_rows(z, k),
    )


# The GEMMs of the tiled algorithm follow PyTorch's float32 matmul precision by themselves, so
# allow_tf32 needs no passing on.
TILED = Kernels(_tiled_forward, _tiled_backward, _tiled_loss_forward_backward)


def _cuda_tile(dtype: torch.dtype) -> int:
    """Rows (= columns) of one block tile of the CUDA streaming kernels (csrc/cuda/README.md);
    their output chunk of the feature dimension is twice as wide."""
    return 32 if dtype == torch.float64 else 64


def _cuda_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    tile = _cuda_tile(z.dtype)
    splits = planner.reduction_splits(
        -(-z.shape[0] // tile), -(-k.shape[0] // tile), device=z.device, max_splits=128,
        partial_bytes_per_split=2 * z.shape[0] * _acc_bytes(z),
    )
    return torch.ops.rcl_kernels.cuda_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, splits
    )


def _cuda_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                   allow_tf32):
    tile = _cuda_tile(z.dtype)
    n_tiles, m_tiles = -(-z.shape[0] // tile), -(-k.shape[0] // tile)
    d_chunks = -(-z.shape[1] // (2 * tile))
    row_bytes = z.shape[1] * _acc_bytes(z)
    row_pass = planner.reduction_splits(
        n_tiles * d_chunks, m_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=z.shape[0] * row_bytes,
    )
    col_pass = planner.reduction_splits(
        m_tiles * d_chunks, n_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=k.shape[0] * row_bytes,
    )
    return torch.ops.rcl_kernels.cuda_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, row_pass, col_pass,
    )


def _triton_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                    allow_tf32, *, variant):
    return torch.ops.rcl_kernels.triton_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, variant,
    )


def _triton_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                     scale, allow_tf32, *, variant):
    return torch.ops.rcl_kernels.triton_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, variant,
    )


def triton_streaming(variant: str) -> Kernels:
    """The Triton kernels of one variant (a name in triton_lse.VARIANTS)."""
    return Kernels(functools.partial(_triton_forward, variant=variant),
                   functools.partial(_triton_backward, variant=variant), label_dtype=torch.int32)


def _cuda_mma_tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(forward rows, forward columns, backward columns, backward rows, d chunk) of a block of the
    mma.sync kernels (csrc/cuda/README.md, "Dtype paths and tiles")."""
    if dtype == torch.float64:
        return 64, 64, 64, 32, 32
    return (128, 64, 128, 64, 64) if dtype == torch.float32 else (128, 64, 128, 64, 128)


def _cuda_mma_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                      allow_tf32):
    rows, cols, _, _, _ = _cuda_mma_tiles(z.dtype)
    # Their partials do not grow with the split count (merged behind a semaphore).
    splits = planner.reduction_splits(-(-z.shape[0] // rows), -(-k.shape[0] // cols),
                                      device=z.device, max_splits=128)
    return torch.ops.rcl_kernels.cuda_mma_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, splits
    )


def _cuda_mma_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                       scale, allow_tf32):
    _, _, cols, rows, chunk = _cuda_mma_tiles(z.dtype)
    splits = planner.reduction_splits(-(-k.shape[0] // cols) * -(-z.shape[1] // chunk),
                                      -(-z.shape[0] // rows), device=z.device, max_splits=16)
    return torch.ops.rcl_kernels.cuda_mma_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, splits,
    )


CUDA_STREAMING = {
    # The wmma launchers refuse larger d (csrc/cuda/masked_lse_kernels.cuh).
    "wmma": Kernels(_cuda_forward, _cuda_backward, max_dim=4096),
    "mma": Kernels(_cuda_mma_forward, _cuda_mma_backward),
}


CPU_STREAMING = Kernels(_cpu_forward, _cpu_backward)
