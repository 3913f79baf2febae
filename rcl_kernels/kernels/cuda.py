"""The cuda backend: the C++/CUDA kernels of rcl_kernels._C on CUDA tensors, every floating dtype
(compiled when the extension was built with nvcc and a CUDA PyTorch).

Candidates, in its order of preference (the first of an algorithm is its default):
    cuda:wmma   streaming: wmma tiles, split reductions summed in a fixed order (the timed one)
    cuda:mma    streaming: mma.sync with ldmatrix/cp.async, one-pass backward in semaphore order
    cuda:tiled  cuBLAS GEMMs per block of rows, a CUDA epilogue (rcl_kernels.kernels.tiled)
"cuda" and "cuda:streaming" mean the streaming variant RCL_KERNELS_CUDA_VARIANT names (default
wmma). Split counts come from rcl_kernels.kernels.planner; tile sizes are the launchers' own
(csrc/cuda/README.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from .._dtypes import FLOATING
from . import planner
from .candidate import Backend, Candidate
from .contract import EXTENSION_ERROR, Kernels, acc_bytes, compiled_kernel_for, register_compiled_fakes
from .tiled import TILED


def _wmma_tile(dtype: torch.dtype) -> int:
    """Rows (= columns) of one block tile of the wmma kernels; their output chunk of the feature
    dimension is twice as wide."""
    return 32 if dtype == torch.float64 else 64


def _wmma_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    tile = _wmma_tile(z.dtype)
    splits = planner.reduction_splits(
        -(-z.shape[0] // tile), -(-k.shape[0] // tile), device=z.device, max_splits=128,
        partial_bytes_per_split=2 * z.shape[0] * acc_bytes(z),
    )
    return torch.ops.rcl_kernels.wmma_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, splits
    )


def _wmma_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                   allow_tf32):
    tile = _wmma_tile(z.dtype)
    n_tiles, m_tiles = -(-z.shape[0] // tile), -(-k.shape[0] // tile)
    d_chunks = -(-z.shape[1] // (2 * tile))
    row_bytes = z.shape[1] * acc_bytes(z)
    row_pass = planner.reduction_splits(
        n_tiles * d_chunks, m_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=z.shape[0] * row_bytes,
    )
    col_pass = planner.reduction_splits(
        m_tiles * d_chunks, n_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=k.shape[0] * row_bytes,
    )
    return torch.ops.rcl_kernels.wmma_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, row_pass, col_pass,
    )


def _mma_tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(forward rows, forward columns, backward columns, backward rows, d chunk) of a block of the
    mma.sync kernels (csrc/cuda/README.md, "Dtype paths and tiles")."""
    if dtype == torch.float64:
        return 64, 64, 64, 32, 32
    return (128, 64, 128, 64, 64) if dtype == torch.float32 else (128, 64, 128, 64, 128)


def _mma_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                 allow_tf32):
    rows, cols, _, _, _ = _mma_tiles(z.dtype)
    # Their partials do not grow with the split count (merged behind a semaphore).
    splits = planner.reduction_splits(-(-z.shape[0] // rows), -(-k.shape[0] // cols),
                                      device=z.device, max_splits=128)
    return torch.ops.rcl_kernels.mma_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, splits
    )


def _mma_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                  scale, allow_tf32):
    _, _, cols, rows, chunk = _mma_tiles(z.dtype)
    splits = planner.reduction_splits(-(-k.shape[0] // cols) * -(-z.shape[1] // chunk),
                                      -(-z.shape[0] // rows), device=z.device, max_splits=16)
    return torch.ops.rcl_kernels.mma_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, splits,
    )


VARIANTS = {
    # The wmma launchers refuse larger d (csrc/cuda/wmma_lse_kernels.cuh).
    "wmma": Kernels(_wmma_forward, _wmma_backward, max_dim=4096),
    "mma": Kernels(_mma_forward, _mma_backward),
}
register_compiled_fakes("wmma_lse", "mma_lse")


def unavailable_reason(device: torch.device | None) -> str | None:
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if not compiled_kernel_for("wmma_lse_forward", "CUDA"):
        return (
            "rcl_kernels._C was built without CUDA kernels (needs nvcc and a CUDA PyTorch at "
            "build time, or RCL_KERNELS_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _compiled(op: str) -> Callable[[torch.device | None], str | None]:
    """A candidate's requirement: its op has a CUDA kernel in this build."""
    def reason(device: torch.device | None) -> str | None:
        if unavailable_reason(device) is not None:
            return None  # the backend's own reason says why
        if not compiled_kernel_for(op, "CUDA"):
            return (f"rcl_kernels._C was built without the CUDA kernel of {op} (needs nvcc and a "
                    "CUDA PyTorch at build time, or RCL_KERNELS_CUDA=1)")
        return None
    return reason


def candidates() -> tuple[Candidate, ...]:
    return (
        Candidate("cuda", "streaming", "wmma", VARIANTS["wmma"], timed_on=("cuda",),
                  description="wmma tiles, split reductions summed in a fixed order"),
        Candidate("cuda", "streaming", "mma", VARIANTS["mma"],
                  requirement=_compiled("mma_lse_forward"),
                  description="mma.sync with ldmatrix/cp.async, one-pass backward in semaphore order"),
        Candidate("cuda", "tiled", "tiled", TILED, requirement=_compiled("tiled_lse_forward"),
                  description="cuBLAS GEMMs per block of rows, a CUDA epilogue"),
    )


BACKEND = Backend("cuda", ("cuda",), FLOATING, unavailable_reason, candidates,
                  ("RCL_KERNELS_CUDA_VARIANT", "wmma"))
