"""The tiled algorithm's op calls, shared by the cpu and cuda backends (one C++ op with a CPU and
a CUDA kernel): a GEMM per block of anchor rows into a bounded workspace, one epilogue, two GEMMs
for the gradients. The loss's per-anchor weights are known before the forward here, so one pass
returns the loss's whole gradient (`loss_forward_backward`)."""

from __future__ import annotations

import torch

from . import planner
from .contract import (
    EXTENSION_ERROR,
    Kernels,
    acc_bytes,
    fake_loss_forward_backward,
    register_compiled_fakes,
)


def _block_rows(z, k) -> int:
    acc = acc_bytes(z)
    # The CPU runs its GEMMs in the accumulation dtype.
    operand_bytes = acc if z.device.type == "cpu" else z.element_size()
    return planner.tiled_block_rows(z.shape[0], k.shape[0], acc_bytes=acc,
                                    operand_bytes=operand_bytes)


def _forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.tiled_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, _block_rows(z, k)
    )


def _backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
              allow_tf32):
    return torch.ops.rcl_kernels.tiled_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        _block_rows(z, k),
    )


def _loss_forward_backward(weights, z, k, row_labels, col_labels, row_bias, col_bias,
                           self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.tiled_loss_forward_backward(
        weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
        _block_rows(z, k),
    )


# The GEMMs of the tiled algorithm follow PyTorch's float32 matmul precision by themselves, so
# allow_tf32 needs no passing on.
TILED = Kernels(_forward, _backward, _loss_forward_backward)

register_compiled_fakes("tiled_lse")
if EXTENSION_ERROR is None:
    torch.library.register_fake("rcl_kernels::tiled_loss_forward_backward")(
        fake_loss_forward_backward)
