"""The triton backend: Triton kernels of the LSE op (rcl_kernels.kernels.contract) on CUDA
tensors, or on CPU tensors under the Triton interpreter; float32, bfloat16 and float16.

It is attention whose only output is the LSE (keys = values = K), so the kernels follow the
flash-attention pattern: the forward streams column tiles with an online (max, sumexp) pair and
saves only lse [N]; the backward recomputes the logits from Z, K and lse. No N×M buffer exists
anywhere; extra memory is O((N + M)·d) (split partials included). One algorithm ("streaming"),
several variants ("triton:<name>", variants.VARIANTS): "triton" and "triton:streaming" mean the
one RCL_KERNELS_TRITON_VARIANT names (default "default", the one timed on a GPU).

Files, one per part:
    variants.py     Variant (the constexpr flags of a variant) and the named presets
    jit_helpers.py  @triton.jit helpers the kernels share (products, exp, tile loads, logits)
    forward.py      forward kernel and the merge of column-split partials
    two_pass.py     backward: the dz and dk kernels
    one_pass.py     backward: the one-pass kernel (a variant)
    configs.py      autotune configs, heuristics, each variant's flags, d chunking
    launch.py       host side: buffers, splits (rcl_kernels.kernels.planner), launches; the
                    tooling API of bench/triton_configs.py
    __init__.py     this entry: availability, the custom ops, the candidates

Numerics: products accumulate in fp32 (tl.dot with an fp32 accumulator). fp32 inputs multiply on
TF32 tensor cores only when allow_tf32, with both operands rounded to nearest TF32 first (the
tensor cores would truncate them); otherwise with FMA, or as 3xTF32 (Variant.fp32_highest).
LSE and softmax in fp32; exp is only ever taken of t − (running max) or t − lse. P is cast to the
input dtype for the second product, as flash attention does. NaN propagation does not rely on
tl.max/tl.maximum (which may drop NaN on the GPU): a NaN logit makes its exp NaN, so the running
sumexp and hence lse become NaN whatever the running max does.

This module imports without Triton (`unavailable_reason` says why the kernels cannot run); the
kernel modules import Triton and are loaded on the first launch.
"""

from __future__ import annotations

import functools
import os

import torch

from ..candidate import Backend, Candidate
from ..contract import Kernels, check_lse_args, fake_backward, fake_forward
from .variants import VARIANTS, Variant

try:  # Triton is optional: the package must import on machines without it.
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    TRITON_IMPORT_ERROR = (
        f"triton is not installed or failed to import ({type(exc).__name__}: {exc})")

# The package's one reading of TRITON_INTERPRET. triton.jit decides at decoration time whether a
# kernel is interpreted, so this is the mode the kernels were built in (setting TRITON_INTERPRET
# later does not change them; unavailable_reason says so).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The label dtypes the Triton ops take; they compare labels in 32 bits when given int32.
LABEL_DTYPES = (torch.int64, torch.int32)


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device`, otherwise a human-readable reason."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRETED:
            return (
                "rcl_kernels.kernels.triton was imported with TRITON_INTERPRET=1, so its kernels "
                "run only on CPU tensors"
            )
        if not torch.cuda.is_available():
            return "torch reports no usable CUDA device"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.version.hip is None and torch.cuda.get_device_capability(index) < (8, 0):
            # bf16 tensor-core dots and the tuned tile sizes assume Ampere or newer.
            return "the Triton kernels need a CUDA device of compute capability 8.0 or newer"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (
                "TRITON_INTERPRET=1 was set after rcl_kernels.kernels.triton was imported; set it "
                "before the import to run the kernels on the CPU"
            )
        return ("no CUDA device and TRITON_INTERPRET is not set (Triton runs on the CPU only "
                "interpreted)")
    return f"the Triton kernels do not support device type {device.type!r}"


# --------------------------------------------------------------------------------------------------
# The custom ops (Python ops over the kernels; the variant reaches them as an argument).
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("rcl_kernels::triton_lse_forward", mutates_args=())
def triton_lse_forward(
    z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor, col_labels: torch.Tensor,
    row_bias: torch.Tensor, col_bias: torch.Tensor, self_offset: int, scale: float,
    allow_tf32: bool, variant: str,
) -> torch.Tensor:
    from . import launch

    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, label_dtypes=LABEL_DTYPES)
    return launch.lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
        variant=variant,
    )


@torch.library.custom_op("rcl_kernels::triton_lse_backward", mutates_args=())
def triton_lse_backward(
    grad_lse: torch.Tensor, z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor,
    col_labels: torch.Tensor, row_bias: torch.Tensor, col_bias: torch.Tensor, lse: torch.Tensor,
    self_offset: int, scale: float, allow_tf32: bool, variant: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import launch

    check_lse_args(z, k, row_labels, col_labels, row_bias, col_bias, lse, grad_lse,
                   label_dtypes=LABEL_DTYPES)
    return launch.lse_backward(
        grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, variant=variant,
    )


torch.library.register_fake("rcl_kernels::triton_lse_forward")(
    functools.partial(fake_forward, label_dtypes=LABEL_DTYPES))
torch.library.register_fake("rcl_kernels::triton_lse_backward")(
    functools.partial(fake_backward, label_dtypes=LABEL_DTYPES))


def _forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
             allow_tf32, *, variant):
    return torch.ops.rcl_kernels.triton_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, variant,
    )


def _backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
              scale, allow_tf32, *, variant):
    return torch.ops.rcl_kernels.triton_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, variant,
    )


def kernels(variant: str) -> Kernels:
    """The Kernels of one variant (a name in VARIANTS)."""
    return Kernels(functools.partial(_forward, variant=variant),
                   functools.partial(_backward, variant=variant), label_dtype=torch.int32)


def candidates() -> tuple[Candidate, ...]:
    return tuple(
        Candidate("triton", "streaming", name, kernels(name),
                  deterministic=variant.deterministic, timed_on=("cuda",) if name == "default" else (),
                  description=f"Triton variant {name} ({Variant.__name__}: "
                              f"backward {variant.backward})")
        for name, variant in VARIANTS.items()
    )


def _availability(device: torch.device | None) -> str | None:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return unavailable_reason(device)


# CUDA tensors, or CPU tensors when Triton interprets (unavailable_reason).
BACKEND = Backend("triton", ("cuda", "cpu"), (torch.float32, torch.bfloat16, torch.float16),
                  _availability, candidates, ("RCL_KERNELS_TRITON_VARIANT", "default"))
