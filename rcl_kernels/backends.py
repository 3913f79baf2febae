"""The backends: what each takes, why it refuses an input, the kernels it runs, and auto's choice.

A backend is one object that owns its kernels and its capability table (device types, dtypes,
largest feature dimension, algorithms). `backend="auto"`, an explicit choice and the fused
autograd all read the same object: a backend name is resolved once, in `select_backend`.

Refusals list every reason (as xformers' `not_supported_reasons` does). `auto` picks the measured
winner for the input; when no fused backend can take an input it warns once, naming why each one
refused, before running the N x M reference, and raises instead when the reference would need
more than REFERENCE_MEMORY_BUDGET_BYTES.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import _ops, planner
from ._dtypes import FLOATING, dtype_name, dtype_names

ALGORITHMS = ("streaming", "tiled")

# Above this estimate of its N x M buffers, auto refuses to fall back to the reference (an
# explicit backend="reference" still runs). 6 N x M matrices of the input dtype: logits, masks,
# weights, exponentials and their gradients (the bench's estimate, close to measured peaks).
REFERENCE_MEMORY_BUDGET_BYTES = 4 << 30
_REFERENCE_MATRICES = 6


def reference_bytes(n: int, m: int, dtype: torch.dtype) -> int:
    return _REFERENCE_MATRICES * n * m * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Kernels:
    """The LSE kernels of one backend and algorithm (math and argument contract: csrc/ops.cpp):
        forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32) -> lse
        backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                 scale, allow_tf32) -> (dz, dk)
        forward_backward(weights, z, k, ..., self_offset, scale, allow_tf32) -> (lse, dz, dk):
                 the gradient for given per-anchor weights in the same pass (None: the
                 algorithm has none, as a streaming forward cannot know a row's lse in time)
    """

    forward: Callable
    backward: Callable
    forward_backward: Callable | None = None
    max_dim: int | None = None  # largest feature dimension the kernels take


@dataclass(frozen=True)
class Problem:
    """What a backend is asked to run: N anchors against M columns of width d."""

    device: torch.device
    dtype: torch.dtype
    rows: int
    columns: int
    dim: int


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    availability: Callable[[torch.device | None], str | None]
    kernels: Mapping[str, Kernels] = field(default_factory=dict)  # per algorithm; {} = reference

    @property
    def fused(self) -> bool:
        return bool(self.kernels)

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.kernels)

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        """Why this backend cannot run on this machine (on `device`), or None."""
        return self.availability(device)

    def algorithm_reasons(self, problem: Problem, algorithm: str) -> list[str]:
        """Why this backend's `algorithm` cannot run `problem` (beyond device and dtype)."""
        kernels = self.kernels.get(algorithm)
        if kernels is None:
            return [f"it has the algorithms {self.algorithms or '(none)'}, not {algorithm!r}"]
        if kernels.max_dim is not None and problem.dim > kernels.max_dim:
            return [f"its {algorithm} kernels take feature dims d <= {kernels.max_dim}, got d={problem.dim}"]
        return []

    def not_supported_reasons(self, problem: Problem, algorithm: str = "auto") -> list[str]:
        """Every reason this backend cannot run `problem` with `algorithm` ("auto": with any of
        its algorithms); empty when it can."""
        reasons = []
        if problem.device.type not in self.device_types:
            reasons.append(f"it runs on {'/'.join(self.device_types)} tensors, got {problem.device.type}")
        else:
            reason = self.unavailable_reason(problem.device)
            if reason is not None:
                reasons.append(reason)
        if problem.dtype not in self.dtypes:
            reasons.append(f"it takes {dtype_names(self.dtypes)}, got {dtype_name(problem.dtype)}")
        if algorithm != "auto":
            reasons += self.algorithm_reasons(problem, algorithm)
        elif self.fused and self.default_algorithm(problem) is None:
            reasons += [r for name in self.algorithms for r in self.algorithm_reasons(problem, name)]
        return reasons

    def default_algorithm(self, problem: Problem) -> str | None:
        """The first algorithm (in the order of `kernels`) that can run `problem`."""
        return next((a for a in self.algorithms if not self.algorithm_reasons(problem, a)), None)


# --------------------------------------------------------------------------------------------------
# The kernels of each backend, with the uniform signature of `Kernels`.
# --------------------------------------------------------------------------------------------------
def _cpu_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    return torch.ops.rcl_kernels.cpu_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale
    )


def _cpu_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                  allow_tf32):
    return torch.ops.rcl_kernels.cpu_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale
    )


def _tiled_block_rows(z, k) -> int:
    acc_bytes = 8 if z.dtype == torch.float64 else 4
    if z.device.type == "cpu":  # GEMMs in the accumulation dtype, blocks that stay in cache
        return planner.tiled_block_rows(z.shape[0], k.shape[0], acc_bytes=acc_bytes,
                                        operand_bytes=acc_bytes, max_rows=planner.CPU_TILED_MAX_ROWS)
    return planner.tiled_block_rows(z.shape[0], k.shape[0], acc_bytes=acc_bytes,
                                    operand_bytes=z.element_size())


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


def _tiled_forward_backward(weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset,
                            scale, allow_tf32):
    return torch.ops.rcl_kernels.tiled_lse_forward_backward(
        weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
        _tiled_block_rows(z, k),
    )


# The GEMMs of the tiled algorithm follow PyTorch's float32 matmul precision by themselves, so
# allow_tf32 needs no passing on.
_TILED = Kernels(_tiled_forward, _tiled_backward, _tiled_forward_backward)


def _cuda_tile(dtype: torch.dtype) -> int:
    """Rows (= columns) of one block tile of the CUDA streaming kernels (csrc/cuda/README.md);
    their output chunk of the feature dimension is twice as wide."""
    return 32 if dtype == torch.float64 else 64


def _cuda_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32):
    tile = _cuda_tile(z.dtype)
    splits = planner.reduction_splits(
        -(-z.shape[0] // tile), -(-k.shape[0] // tile), device=z.device, max_splits=128,
        partial_bytes_per_split=2 * z.shape[0] * (8 if z.dtype == torch.float64 else 4),
    )
    return torch.ops.rcl_kernels.cuda_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32, splits
    )


def _cuda_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
                   allow_tf32):
    tile = _cuda_tile(z.dtype)
    n_tiles, m_tiles = -(-z.shape[0] // tile), -(-k.shape[0] // tile)
    d_chunks = -(-z.shape[1] // (2 * tile))
    acc_bytes = z.shape[1] * (8 if z.dtype == torch.float64 else 4)
    row_pass = planner.reduction_splits(
        n_tiles * d_chunks, m_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=z.shape[0] * acc_bytes,
    )
    col_pass = planner.reduction_splits(
        m_tiles * d_chunks, n_tiles, device=z.device, max_splits=16,
        partial_bytes_per_split=k.shape[0] * acc_bytes,
    )
    return torch.ops.rcl_kernels.cuda_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, row_pass, col_pass,
    )


# Kernel variants that no GPU has timed yet are opt-in through the environment, read once here (the
# measured kernels stay the default): RCL_KERNELS_TRITON_VARIANT names one of triton_lse.VARIANTS.
TRITON_VARIANT = os.environ.get("RCL_KERNELS_TRITON_VARIANT", "default")


def _triton_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                    allow_tf32):
    return torch.ops.rcl_kernels.triton_lse_forward(
        z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
        TRITON_VARIANT,
    )


def _triton_backward(grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                     scale, allow_tf32):
    return torch.ops.rcl_kernels.triton_lse_backward(
        grad, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32, TRITON_VARIANT,
    )


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


# The cuda backend's streaming kernels: wmma (timed on the H100) or mma.sync (untimed: one pass,
# any d), by RCL_KERNELS_CUDA_VARIANT, read once here.
CUDA_VARIANT = os.environ.get("RCL_KERNELS_CUDA_VARIANT", "wmma")
_CUDA_STREAMING = {
    # The wmma launchers refuse larger d (csrc/cuda/masked_lse_kernels.cuh).
    "wmma": Kernels(_cuda_forward, _cuda_backward, max_dim=4096),
    "mma": Kernels(_cuda_mma_forward, _cuda_mma_backward),
}


# --------------------------------------------------------------------------------------------------
# Availability on this machine.
# --------------------------------------------------------------------------------------------------
def _triton_unavailable_reason(device: torch.device | None) -> str | None:
    from . import triton_lse  # imports triton lazily itself; this import never fails

    if TRITON_VARIANT not in triton_lse.VARIANTS:
        return (f"RCL_KERNELS_TRITON_VARIANT={TRITON_VARIANT!r} is not one of "
                f"{sorted(triton_lse.VARIANTS)}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return triton_lse.unavailable_reason(device)


def _cpu_unavailable_reason(device: torch.device | None) -> str | None:
    return _ops.EXTENSION_ERROR


def _cuda_unavailable_reason(device: torch.device | None) -> str | None:
    if CUDA_VARIANT not in _CUDA_STREAMING:
        return f"RCL_KERNELS_CUDA_VARIANT={CUDA_VARIANT!r} is not one of {sorted(_CUDA_STREAMING)}"
    if _ops.EXTENSION_ERROR is not None:
        return _ops.EXTENSION_ERROR
    if not _ops.compiled_kernel_for("cuda_lse_forward", "CUDA"):
        return (
            "rcl_kernels._C was built without CUDA kernels (needs nvcc and a CUDA PyTorch at "
            "build time, or RCL_KERNELS_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", ("cpu", "cuda"), FLOATING, lambda device: None),
        # The algorithms of a backend in the order of preference: the measured winner first.
        Backend("cpu", ("cpu",), FLOATING, _cpu_unavailable_reason,
                {"tiled": _TILED, "streaming": Kernels(_cpu_forward, _cpu_backward)}),
        Backend("cuda", ("cuda",), FLOATING, _cuda_unavailable_reason, {
            "streaming": _CUDA_STREAMING.get(CUDA_VARIANT, _CUDA_STREAMING["wmma"]),
            "tiled": _TILED,
        }),
        # CUDA tensors, or CPU tensors when Triton interprets (triton_lse.unavailable_reason).
        Backend("triton", ("cuda", "cpu"), (torch.float32, torch.bfloat16, torch.float16),
                _triton_unavailable_reason,
                {"streaming": Kernels(_triton_forward, _triton_backward)}),
    )
}


def available_backends() -> dict[str, str | None]:
    """Map each backend name to None when it works here, else to the reason it does not."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


# --------------------------------------------------------------------------------------------------
# auto: the measured winner per (device, dtype, size).
# --------------------------------------------------------------------------------------------------
# Largest N·M at which the N x M reference was measured faster than every fused backend on an
# H100 (shared/gpu-runs/2026-11-26-h100.md: N = 512, M = 8,654, d = 1024, fp32: reference 2.22 ms,
# cuda 13.1 ms, triton 27.5 ms; at N = 512, M = 1,512 in fp32 and bf16 likewise). At the next
# measured size (N = 8,192, M = 9,192, d = 128, bf16) triton won (3.71 ms against 5.67 ms).
_CUDA_REFERENCE_MAX_ENTRIES = 512 * 8654


def _auto_order(problem: Problem, allow_tf32: bool) -> list[tuple[str, str | None]]:
    """(backend, algorithm) pairs in the order auto tries them, fastest measured first."""
    if problem.device.type != "cuda":
        # CPU (2-core Xeon, bench/results/): tiled 1.6-1.9x faster than streaming from N = 1,024 to
        # 16,384, which was 5.7x faster than the reference at N = 4,096.
        return [("cpu", "tiled"), ("triton", "streaming")]
    fused = [("triton", "streaming"), ("cuda", "streaming")]
    if problem.dtype == torch.float32 and not allow_tf32:
        # fp32 "highest", N = 32,768: cuda 72.2 ms, triton 111.6 ms (same GPU run).
        fused.reverse()
    # Otherwise (bf16 at N = 8,192 to 1M, TF32 at N = 32,768) triton is 2.1-2.5x faster than cuda.
    if problem.rows * problem.columns <= _CUDA_REFERENCE_MAX_ENTRIES:
        return [("reference", None)] + fused
    return fused


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def _describe(refusals: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refusals.items())


def _fallback_to_reference(problem: Problem, refusals: dict[str, list[str]]) -> tuple[Backend, None]:
    reference_reasons = BACKENDS["reference"].not_supported_reasons(problem)
    if reference_reasons:
        refusals["reference"] = reference_reasons
        raise ValueError(f"backend='auto': no backend can run this input ({_describe(refusals)})")
    need = reference_bytes(problem.rows, problem.columns, problem.dtype)
    if need > REFERENCE_MEMORY_BUDGET_BYTES:
        raise ValueError(
            f"backend='auto': no fused backend can take this input ({_describe(refusals)}), and "
            f"the N x M reference would need about {need / 2**30:.1f} GiB (N={problem.rows}, "
            f"M={problem.columns}), above the {REFERENCE_MEMORY_BUDGET_BYTES / 2**30:.0f} GiB "
            "budget of auto; pass backend='reference' to run it anyway"
        )
    _warn_once(f"rcl_kernels: backend='auto' falls back to the N x M reference ({_describe(refusals)})")
    return BACKENDS["reference"], None


def select_backend(
    name: str, algorithm: str, problem: Problem, allow_tf32: bool
) -> tuple[Backend, str | None]:
    """(backend, algorithm) for `name` ("auto" or one of BACKENDS) and `algorithm` ("auto" or one
    of ALGORITHMS); the algorithm is None for the reference. Raises ValueError naming every
    reason when the choice cannot run the problem."""
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected 'auto' or one of {ALGORITHMS}, got {algorithm!r}")
    if name == "auto":
        order = _auto_order(problem, allow_tf32)
        if algorithm != "auto":  # a forced algorithm: the fused backends that have it
            order = [(candidate, algorithm) for candidate, _ in order if candidate != "reference"]
        refusals = {}
        for candidate, candidate_algorithm in order:
            backend = BACKENDS[candidate]
            reasons = backend.not_supported_reasons(problem, candidate_algorithm or "auto")
            if not reasons:
                return backend, candidate_algorithm
            refusals[candidate] = reasons
        if algorithm != "auto":
            raise ValueError(f"algorithm={algorithm!r}: no backend can run it here ({_describe(refusals)})")
        return _fallback_to_reference(problem, refusals)
    if name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    backend = BACKENDS[name]
    reasons = backend.not_supported_reasons(problem, algorithm)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run this input: {'; '.join(reasons)}")
    if not backend.fused:
        return backend, None
    return backend, backend.default_algorithm(problem) if algorithm == "auto" else algorithm
