"""The backends, what each supports, and the choice behind backend="auto".

Each backend answers two questions with a reason string, or None when it can: is it usable on
this machine at all (`unavailable_reason`), and can it take this input (`unsupported_reason`).
A refusal is always explained, never silent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ops

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The order "auto" tries, per device type, fastest first.
# CPU: `cpu` is 5.7x faster than `reference` at N=4096 (2x at N=1024, equal at a few hundred
# anchors) and runs where the reference runs out of memory (bench/results/cpu-bcl-*.json).
# CUDA: provisional until bench/gpu_check.sh has run on a GPU (README, "Numbers"); the fused
# backends are tried before the N x M reference.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def _triton_unavailable_reason(device: torch.device | None) -> str | None:
    try:
        from . import triton_lse
    except ImportError as error:  # the module itself imports triton lazily; this is a bug guard
        return f"rcl_kernels.triton_lse failed to import: {error}"
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return triton_lse.unavailable_reason(device)


def _cuda_unavailable_reason() -> str | None:
    if _ops.EXTENSION_ERROR is not None:
        return _ops.EXTENSION_ERROR
    if not _ops.compiled_kernel_for("cuda"):
        return (
            "rcl_kernels._C was built without CUDA kernels (needs nvcc and a CUDA PyTorch at "
            "build time, or RCL_KERNELS_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    fused: bool  # False: the N x M reference
    _unavailable: Callable[[torch.device | None], str | None]

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        return self._unavailable(device)

    def unsupported_reason(self, features: torch.Tensor) -> str | None:
        reason = self.unavailable_reason(features.device)
        if reason is not None:
            return reason
        if features.device.type not in self.device_types:
            return f"it runs on {'/'.join(self.device_types)} tensors, got {features.device.type}"
        if features.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"it takes {names}, got {str(features.dtype).removeprefix('torch.')}"
        return None


def _triton_device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", ("cpu", "cuda"), FLOATING, False, lambda device: None),
    "cpu": Backend("cpu", ("cpu",), FLOATING, True, lambda device: _ops.EXTENSION_ERROR),
    "cuda": Backend("cuda", ("cuda",), FLOATING, True, lambda device: _cuda_unavailable_reason()),
    "triton": Backend(
        "triton", _triton_device_types(), (torch.float32, torch.bfloat16, torch.float16), True,
        _triton_unavailable_reason,
    ),
}


def available_backends() -> dict[str, str | None]:
    """Map each backend name to None when it works here, else to the reason it does not."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


def select_backend(name: str, features: torch.Tensor) -> Backend:
    """The backend for `name` ("auto" or one of BACKENDS); ValueError when it cannot run."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(features.device.type, ("reference",)):
            if BACKENDS[candidate].unsupported_reason(features) is None:
                return BACKENDS[candidate]
        return BACKENDS["reference"]
    if name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    reason = BACKENDS[name].unsupported_reason(features)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this input: {reason}")
    return BACKENDS[name]
