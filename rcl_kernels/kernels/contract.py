"""The kernel-op contract every backend's ops keep (math and schemas: csrc/ops.cpp):

    t_ij  = scale·<z_i, k_j> + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j])
    lse_i = log Σ_{j ≠ i + self_offset} exp(t_ij)            (−inf when no column is left)
    dz    = scale · (g ⊙ P) · K        dk = scale · (g ⊙ P)ᵀ · Z     (p_ij = exp(t_ij − lse_i))

Here: the compiled library rcl_kernels._C (loading it, which kernels it holds), the argument
checks of every op (as torch._check calls, so they hold for fake tensors too), the generic fake
kernels that torch.compile traces with and torch.library.opcheck compares against the real ones,
and `Kernels`, the one signature through which the loss calls any candidate's ops. The ops have
no autograd of their own: rcl_kernels.fused differentiates the whole loss around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .._dtypes import FLOATING, accumulation_dtype


def _load_extension() -> str | None:
    """Import the compiled ops; return why they are unavailable, or None."""
    try:
        from .. import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as error:
        return f"the C++ extension rcl_kernels._C is not built ({error}); run `make install`"
    return None


EXTENSION_ERROR = _load_extension()


def compiled_kernel_for(op_name: str, dispatch_key: str) -> bool:
    """Whether rcl_kernels._C holds a kernel of `rcl_kernels::<op_name>` for `dispatch_key`."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rcl_kernels::{op_name}", dispatch_key)


@dataclass(frozen=True)
class Kernels:
    """The LSE kernels of one candidate behind one signature:
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


def acc_bytes(z: torch.Tensor) -> int:
    """Bytes of one element of the accumulation dtype (float64 for float64 inputs, else float32)."""
    return 8 if z.dtype == torch.float64 else 4


def check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse=None, grad_lse=None,
                   label_dtypes=(torch.int64,)):
    """The argument contract of every LSE kernel op. label_dtypes: the Triton ops also take int32
    labels (both of one dtype), which their kernels compare in 32 bits."""
    torch._check(z.dim() == 2 and k.dim() == 2, lambda: f"z and k must be 2-D, got {z.shape}, {k.shape}")
    n, m = z.shape[0], k.shape[0]
    torch._check(z.shape[1] == k.shape[1], lambda: f"z {tuple(z.shape)} and k {tuple(k.shape)} must share d")
    torch._check(z.dtype in FLOATING and k.dtype == z.dtype,
                 lambda: f"z and k must share a floating dtype, got {z.dtype} and {k.dtype}")
    acc = accumulation_dtype(z.dtype)
    label_dtype = row_labels.dtype if row_labels.dtype in label_dtypes else torch.int64
    vectors = {"row_labels": (row_labels, n, label_dtype),
               "col_labels": (col_labels, m, label_dtype),
               "row_bias": (row_bias, n, acc), "col_bias": (col_bias, m, acc)}
    if lse is not None:
        vectors["lse"] = (lse, n, acc)
    if grad_lse is not None:
        vectors["grad_lse"] = (grad_lse, n, acc)
    for name, (vector, length, dtype) in vectors.items():
        torch._check(vector.shape == (length,) and vector.dtype == dtype,
                     lambda: f"{name} must be {dtype} of shape ({length},), got {vector.dtype} {tuple(vector.shape)}")
        torch._check(vector.device == z.device, lambda: f"{name} must be on {z.device}, got {vector.device}")
    torch._check(k.device == z.device, lambda: f"k must be on {z.device}, got {k.device}")


def fake_forward(z, k, row_labels, col_labels, row_bias, col_bias, *options,
                 label_dtypes=(torch.int64,)):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, label_dtypes=label_dtypes)
    return z.new_empty((z.shape[0],), dtype=accumulation_dtype(z.dtype))


def fake_backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, *options,
                  label_dtypes=(torch.int64,)):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse, grad_lse,
                   label_dtypes=label_dtypes)
    acc = accumulation_dtype(z.dtype)
    return z.new_empty(z.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


def fake_loss_forward_backward(weights, z, k, row_labels, col_labels, row_bias, col_bias, *options):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, grad_lse=weights)
    acc = accumulation_dtype(z.dtype)
    lse = z.new_empty((z.shape[0],), dtype=acc)
    positive_sum = z.new_empty((z.shape[0],), dtype=acc)
    return lse, positive_sum, z.new_empty(z.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


def register_compiled_fakes(*prefixes: str) -> None:
    """The generic fakes of the compiled ops `rcl_kernels::<prefix>_forward` and `_backward`
    (a no-op without the extension: their schemas come with it)."""
    if EXTENSION_ERROR is not None:
        return
    for prefix in prefixes:
        torch.library.register_fake(f"rcl_kernels::{prefix}_forward")(fake_forward)
        torch.library.register_fake(f"rcl_kernels::{prefix}_backward")(fake_backward)
