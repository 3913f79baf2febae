"""torch.library glue of the kernel ops (schemas and math: csrc/ops.cpp).

* `rcl_kernels::cpu_lse_*`, `rcl_kernels::cuda_lse_*`, `rcl_kernels::cuda_mma_lse_*` and
  `rcl_kernels::tiled_lse_*` are C++ ops
  of rcl_kernels._C (their schemas always exist; the CUDA kernels when the extension was built with
  nvcc);
* `rcl_kernels::triton_lse_*` are Python custom ops over the Triton kernels.

Each op has a fake kernel that checks the shapes and dtypes of its arguments, as the real kernels
do, and returns empty outputs of the right shape: torch.compile traces through the ops with it,
and torch.library.opcheck compares it with the real kernel. The ops have no autograd of their own:
rcl_kernels.fused differentiates the whole loss around them.
"""

from __future__ import annotations

import torch

from ._dtypes import FLOATING, accumulation_dtype


def _load_extension() -> str | None:
    """Import the compiled ops; return why they are unavailable, or None."""
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as error:
        return f"the C++ extension rcl_kernels._C is not built ({error}); run `make install`"
    return None


EXTENSION_ERROR = _load_extension()


def compiled_kernel_for(op_name: str, dispatch_key: str) -> bool:
    """Whether rcl_kernels._C holds a kernel of `rcl_kernels::<op_name>` for `dispatch_key`."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rcl_kernels::{op_name}", dispatch_key)


def check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse=None, grad_lse=None,
                   label_dtypes=(torch.int64,)):
    """The argument contract of every LSE kernel op (csrc/ops.cpp), as torch._check calls so that
    it holds for fake tensors too. label_dtypes: the Triton ops also take int32 labels (both of
    one dtype), which their kernels compare in 32 bits."""
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


TRITON_LABEL_DTYPES = (torch.int64, torch.int32)


def _fake_forward(z, k, row_labels, col_labels, row_bias, col_bias, *options,
                  label_dtypes=(torch.int64,)):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, label_dtypes=label_dtypes)
    return z.new_empty((z.shape[0],), dtype=accumulation_dtype(z.dtype))


def _fake_backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, *options,
                   label_dtypes=(torch.int64,)):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse, grad_lse,
                   label_dtypes=label_dtypes)
    acc = accumulation_dtype(z.dtype)
    return z.new_empty(z.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


def _fake_loss_forward_backward(weights, z, k, row_labels, col_labels, row_bias, col_bias, *options):
    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, grad_lse=weights)
    acc = accumulation_dtype(z.dtype)
    lse = z.new_empty((z.shape[0],), dtype=acc)
    positive_sum = z.new_empty((z.shape[0],), dtype=acc)
    return lse, positive_sum, z.new_empty(z.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


@torch.library.custom_op("rcl_kernels::triton_lse_forward", mutates_args=())
def triton_lse_forward(
    z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor,
    row_bias: torch.Tensor, col_bias: torch.Tensor, self_offset: int, scale: float,
    allow_tf32: bool, variant: str,
) -> torch.Tensor:
    from . import triton_lse

    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias,
                   label_dtypes=TRITON_LABEL_DTYPES)
    return triton_lse.lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
        variant=variant,
    )


@torch.library.custom_op("rcl_kernels::triton_lse_backward", mutates_args=())
def triton_lse_backward(
    grad_lse: torch.Tensor, z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor,
    col_labels: torch.Tensor, row_bias: torch.Tensor, col_bias: torch.Tensor, lse: torch.Tensor,
    self_offset: int, scale: float, allow_tf32: bool, variant: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_lse

    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse, grad_lse,
                   label_dtypes=TRITON_LABEL_DTYPES)
    return triton_lse.lse_backward(
        grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, variant=variant,
    )


torch.library.register_fake("rcl_kernels::triton_lse_forward")(
    lambda *args, **kwargs: _fake_forward(*args, **kwargs, label_dtypes=TRITON_LABEL_DTYPES))
torch.library.register_fake("rcl_kernels::triton_lse_backward")(
    lambda *args, **kwargs: _fake_backward(*args, **kwargs, label_dtypes=TRITON_LABEL_DTYPES))
_PREFIXES = []
if EXTENSION_ERROR is None:
    _PREFIXES += ["rcl_kernels::cpu_lse", "rcl_kernels::cuda_lse", "rcl_kernels::cuda_mma_lse",
                  "rcl_kernels::tiled_lse"]
    torch.library.register_fake("rcl_kernels::tiled_loss_forward_backward")(
        _fake_loss_forward_backward)
for _prefix in _PREFIXES:
    torch.library.register_fake(f"{_prefix}_forward")(_fake_forward)
    torch.library.register_fake(f"{_prefix}_backward")(_fake_backward)
