"""torch.library glue for the fused masked log-sum-exp ops (schema and math: csrc/ops.cpp).

Each fused backend provides a forward op and a backward op with the same signatures:
* `rcl_kernels::masked_lse_forward/_backward` are defined in C++ (rcl_kernels._C) with CPU and,
  when compiled, CUDA kernels — the "cpu" and "cuda" backends;
* `rcl_kernels::triton_masked_lse_forward/_backward` are Python custom ops over the Triton kernels.
All of them get the same fake (meta) kernels, so torch.compile can trace through them, and the
same autograd formula: the forward saves only its inputs and the LSE, the backward recomputes.
"""

from __future__ import annotations

import torch

from .fused import accumulation_dtype


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
    return torch.empty_like(z), torch.empty_like(k)


def _register_fake_and_autograd(forward_name: str, backward_name: str, backward_op) -> None:
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(backward_name)(_fake_backward)

    def setup_context(ctx, inputs, output):
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32 = inputs
        ctx.save_for_backward(z, k, row_labels, col_labels, row_bias, col_bias, output)
        ctx.self_offset, ctx.scale, ctx.allow_tf32 = self_offset, scale, allow_tf32

    def backward(ctx, grad_lse):
        z, k, row_labels, col_labels, row_bias, col_bias, lse = ctx.saved_tensors
        dz, dk = backward_op(
            grad_lse.contiguous(), z, k, row_labels, col_labels, row_bias, col_bias, lse,
            ctx.self_offset, ctx.scale, ctx.allow_tf32,
        )
        # The bias vectors are constants of the loss (see rcl_kernels.functional).
        return dz, dk, None, None, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


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


_register_fake_and_autograd(
    "rcl_kernels::triton_masked_lse_forward",
    "rcl_kernels::triton_masked_lse_backward",
    triton_masked_lse_backward,
)

if EXTENSION_ERROR is None:
    _register_fake_and_autograd(
        "rcl_kernels::masked_lse_forward",
        "rcl_kernels::masked_lse_backward",
        torch.ops.rcl_kernels.masked_lse_backward,
    )


def compiled_kernel_for(device_type: str) -> bool:
    """Whether rcl_kernels._C holds a kernel of the C++ op for "cpu" or "cuda" tensors."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("rcl_kernels::masked_lse_forward", key)
