"""torch.library glue for the masked log-sum-exp kernels (schema and math: csrc/ops.cpp).

Each fused backend provides a forward and a backward op with the same signatures:
* `rcl_kernels::masked_lse_forward/_backward`, defined in C++ (rcl_kernels._C) with a CPU and,
  when compiled, a CUDA kernel: the "cpu" and "cuda" backends;
* `rcl_kernels::triton_masked_lse_forward/_backward`, Python custom ops over the Triton kernels.
All get the same fake (meta) kernels, so that torch.compile can trace the code that calls them.
Their autograd lives one level up, in rcl_kernels.fused, where the positive terms join in.
"""

from __future__ import annotations

import torch

from ._dtypes import accumulation_dtype


def _load_extension() -> str | None:
    """Import the compiled ops; return why they are unavailable, or None."""
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as error:
        return f"the C++ extension rcl_kernels._C is not built ({error}); run `make install`"
    return None


EXTENSION_ERROR = _load_extension()


def _fake_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return z.new_empty((z.shape[0],), dtype=accumulation_dtype(z.dtype))


def _fake_backward(
    grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale, allow_tf32
):
    acc = accumulation_dtype(z.dtype)
    return z.new_empty(z.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


@torch.library.custom_op("rcl_kernels::triton_masked_lse_forward", mutates_args=())
def triton_masked_lse_forward(
    z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor,
    row_bias: torch.Tensor, col_bias: torch.Tensor, self_offset: int, scale: float,
    allow_tf32: bool,
) -> torch.Tensor:
    from . import triton_lse

    return triton_lse.masked_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32
    )


@torch.library.custom_op("rcl_kernels::triton_masked_lse_backward", mutates_args=())
def triton_masked_lse_backward(
    grad_lse: torch.Tensor, z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor,
    col_labels: torch.Tensor, row_bias: torch.Tensor, col_bias: torch.Tensor, lse: torch.Tensor,
    self_offset: int, scale: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton_lse

    return triton_lse.masked_lse_backward(
        grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32,
    )


_FAKE_REGISTERED = ["rcl_kernels::triton_masked_lse"]
if EXTENSION_ERROR is None:
    _FAKE_REGISTERED.append("rcl_kernels::masked_lse")
for _prefix in _FAKE_REGISTERED:
    torch.library.register_fake(f"{_prefix}_forward")(_fake_forward)
    torch.library.register_fake(f"{_prefix}_backward")(_fake_backward)


def lse_kernels(backend: str):
    """(forward op, backward op) of a fused backend."""
    if backend == "triton":
        return torch.ops.rcl_kernels.triton_masked_lse_forward, torch.ops.rcl_kernels.triton_masked_lse_backward
    if backend in ("cpu", "cuda"):  # one C++ op; the tensors' device picks the kernel
        return torch.ops.rcl_kernels.masked_lse_forward, torch.ops.rcl_kernels.masked_lse_backward
    raise ValueError(f"backend: {backend!r} has no fused kernels")


def compiled_kernel_for(device_type: str) -> bool:
    """Whether rcl_kernels._C holds a kernel of the C++ op for "cpu" or "cuda" tensors."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("rcl_kernels::masked_lse_forward", key)
