"""The cpu backend: the C++ kernels of rcl_kernels._C on CPU tensors, every floating dtype.

Candidates, in its order of preference (the first of an algorithm is its default):
    cpu:tiled      a GEMM per block of rows into a bounded workspace (rcl_kernels.kernels.tiled)
    cpu:streaming  flash-style tiles with an online log-sum-exp (ops streaming_lse_forward/backward)
Available whenever the extension is built.
"""

from __future__ import annotations

import torch

from .._dtypes import FLOATING
from .candidate import Backend, Candidate
from .contract import EXTENSION_ERROR, Kernels, register_compiled_fakes
from .tiled import TILED


def _forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.streaming_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale
    )


def _backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
              allow_tf32):
    return torch.ops.rcl_kernels.streaming_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale
    )


STREAMING = Kernels(_forward, _backward)
register_compiled_fakes("streaming_lse")


def unavailable_reason(device: torch.device | None) -> str | None:
    return EXTENSION_ERROR


def candidates() -> tuple[Candidate, ...]:
    return (
        Candidate("cpu", "tiled", "tiled", TILED, timed_on=("cpu",),
                  description="a GEMM per block of rows into a bounded workspace, one epilogue, two GEMMs"),
        Candidate("cpu", "streaming", "streaming", STREAMING, timed_on=("cpu",),
                  description="flash-style tiles with an online log-sum-exp"),
    )


BACKEND = Backend("cpu", ("cpu",), FLOATING, unavailable_reason, candidates)
