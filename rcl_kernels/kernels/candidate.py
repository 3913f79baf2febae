"""What every backend declares, as data: the `Problem` it is asked about, its `Candidate`s (one
(backend, algorithm, variant) each: kernels, capability, determinism, the devices a run of ours
has timed it on) and the `Backend` that holds them with its devices, dtypes and availability.

The refusals here are the generic ones (device type, dtype, feature size, a candidate's own
requirement); each backend module (cpu, cuda, triton) supplies its availability and candidates.
rcl_kernels.dispatch reads the registry of these objects and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .._dtypes import dtype_name, dtype_names
from .contract import Kernels

ALGORITHMS = ("streaming", "tiled")


@dataclass(frozen=True)
class Problem:
    """What a backend is asked to run: N anchors against M columns of width d; the reduction and
    whether gradients are needed (None: not known to the caller, read as torch.is_grad_enabled())
    are part of auto's tuning key."""

    device: torch.device
    dtype: torch.dtype
    rows: int
    columns: int
    dim: int
    reduction: str = "mean"
    needs_grad: bool | None = None


@dataclass(frozen=True)
class Candidate:
    """One (backend, algorithm, variant). `kernels` reads as a Backend's does ({algorithm:
    Kernels}, {} for the reference), so the loss runs either alike."""

    backend: str
    algorithm: str | None  # None: the reference (no kernels)
    variant: str
    lse: Kernels | None = None
    deterministic: bool = True
    # The device types a run of ours has timed it on ("cuda": a GPU has timed it).
    timed_on: tuple[str, ...] = ()
    # Why it cannot run on this machine beyond its backend's reasons (e.g. an op not compiled).
    requirement: Callable[[torch.device | None], str | None] | None = None
    description: str = ""

    @property
    def name(self) -> str:
        return self.backend if self.lse is None else f"{self.backend}:{self.variant}"

    @property
    def fused(self) -> bool:
        return self.lse is not None

    @property
    def kernels(self) -> dict[str, Kernels]:
        return {self.algorithm: self.lse} if self.lse is not None else {}


_MADE: dict[str, tuple[Candidate, ...]] = {}


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    availability: Callable[[torch.device | None], str | None]
    # Its candidates, built on first use (the Triton ones import triton).
    make_candidates: Callable[[], tuple[Candidate, ...]] = tuple
    # (environment variable, its default): the variant a bare name or "<name>:streaming" means.
    variant_variable: tuple[str, str] | None = None

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        # Built once per backend name, kept in a plain dict (torch.compile traces a dict lookup,
        # not functools.cached_property's lock).
        made = _MADE.get(self.name)
        if made is None:
            made = _MADE[self.name] = self.make_candidates() or (
                Candidate(self.name, None, self.name, timed_on=("cpu", "cuda"),
                          description="plain PyTorch, N x M matrices: the oracle"),)
        return made

    @property
    def fused(self) -> bool:
        return any(c.fused for c in self.candidates)

    def variant_override(self) -> str | None:
        """The variant the environment names for this backend's streaming algorithm, if any."""
        if self.variant_variable is None:
            return None
        variable, default = self.variant_variable
        return os.environ.get(variable, default)

    def variant_error(self) -> str | None:
        name = self.variant_override()
        if name is None or name in self.variants():
            return None
        return f"{self.variant_variable[0]}={name!r} is not one of {sorted(self.variants())}"

    def variants(self) -> dict[str, Candidate]:
        return {c.variant: c for c in self.candidates}

    def default_candidates(self) -> dict[str, Candidate]:
        """algorithm -> the candidate the backend runs for it, in the backend's order of
        preference (its first candidates; the environment picks the streaming variant)."""
        out: dict[str, Candidate] = {}
        override = self.variant_override()
        for c in self.candidates:
            if c.algorithm == "streaming" and override is not None and override in self.variants():
                c = self.variants()[override]
            out.setdefault(c.algorithm, c)
        return out

    @property
    def kernels(self) -> dict[str, Kernels]:
        """algorithm -> the kernels of its default candidate ({} for the reference)."""
        return {a: c.lse for a, c in self.default_candidates().items() if c.fused}

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.kernels)

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        """Why this backend cannot run on this machine (on `device`), or None."""
        return self.variant_error() or self.availability(device)

    def candidate_reasons(self, problem: Problem, candidate: Candidate) -> list[str]:
        """Why `candidate` cannot run `problem`, beyond its backend's device and dtype reasons."""
        reasons = []
        if candidate.lse is not None and candidate.lse.max_dim is not None \
                and problem.dim > candidate.lse.max_dim:
            reasons.append(f"its {candidate.algorithm} kernels ({candidate.name}) take feature dims "
                           f"d <= {candidate.lse.max_dim}, got d={problem.dim}")
        if candidate.requirement is not None and problem.device.type in self.device_types:
            reason = candidate.requirement(problem.device)
            if reason is not None:
                reasons.append(reason)
        return reasons

    def algorithm_reasons(self, problem: Problem, algorithm: str) -> list[str]:
        """Why this backend's `algorithm` cannot run `problem` (beyond device and dtype)."""
        candidate = self.default_candidates().get(algorithm)
        if candidate is None or not candidate.fused:
            return [f"it has the algorithms {self.algorithms or '(none)'}, not {algorithm!r}"]
        return self.candidate_reasons(problem, candidate)

    def device_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.device.type not in self.device_types:
            reasons.append(f"it runs on {'/'.join(self.device_types)} tensors, got {problem.device.type}")
        else:
            reason = self.unavailable_reason(problem.device)
            if reason is not None:
                reasons.append(reason)
        if problem.dtype not in self.dtypes:
            reasons.append(f"it takes {dtype_names(self.dtypes)}, got {dtype_name(problem.dtype)}")
        return reasons

    def not_supported_reasons(self, problem: Problem, algorithm: str = "auto") -> list[str]:
        """Every reason this backend cannot run `problem` with `algorithm` ("auto": with any of
        its algorithms); empty when it can."""
        reasons = self.device_reasons(problem)
        if algorithm != "auto":
            reasons += self.algorithm_reasons(problem, algorithm)
        elif self.fused and self.default_algorithm(problem) is None:
            reasons += [r for name in self.algorithms for r in self.algorithm_reasons(problem, name)]
        return reasons

    def candidate_not_supported_reasons(self, problem: Problem, candidate: Candidate) -> list[str]:
        """Every reason `candidate` (one of this backend's) cannot run `problem`."""
        return self.device_reasons(problem) + self.candidate_reasons(problem, candidate)

    def default_algorithm(self, problem: Problem) -> str | None:
        """The first algorithm (in the order of preference) that can run `problem`."""
        return next((a for a in self.algorithms if not self.algorithm_reasons(problem, a)), None)

