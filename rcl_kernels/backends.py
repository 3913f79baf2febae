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
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import _ops
from ._dtypes import FLOATING, dtype_name, dtype_names
from ._kernel_calls import (
    CPU_STREAMING,
    CUDA_STREAMING,
    CUDA_VARIANT,
    TILED,
    TRITON_STREAMING,
    TRITON_VARIANT,
    Kernels,
)

ALGORITHMS = ("streaming", "tiled")

# Above this estimate of its N x M buffers, auto refuses to fall back to the reference (an
# explicit backend="reference" still runs). 6 N x M matrices of the input dtype: logits, masks,
# weights, exponentials and their gradients (the bench's estimate, close to measured peaks).
REFERENCE_MEMORY_BUDGET_BYTES = 4 << 30
_REFERENCE_MATRICES = 6


def reference_bytes(n: int, m: int, dtype: torch.dtype) -> int:
    return _REFERENCE_MATRICES * n * m * torch.empty((), dtype=dtype).element_size()


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
    if CUDA_VARIANT not in CUDA_STREAMING:
        return f"RCL_KERNELS_CUDA_VARIANT={CUDA_VARIANT!r} is not one of {sorted(CUDA_STREAMING)}"
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
                {"tiled": TILED, "streaming": CPU_STREAMING}),
        Backend("cuda", ("cuda",), FLOATING, _cuda_unavailable_reason, {
            "streaming": CUDA_STREAMING.get(CUDA_VARIANT, CUDA_STREAMING["wmma"]),
            "tiled": TILED,
        }),
        # CUDA tensors, or CPU tensors when Triton interprets (triton_lse.unavailable_reason).
        Backend("triton", ("cuda", "cpu"), (torch.float32, torch.bfloat16, torch.float16),
                _triton_unavailable_reason,
                {"streaming": TRITON_STREAMING}),
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
