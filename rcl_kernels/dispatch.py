"""The dispatcher: the registry of backends, resolving `backend=`/`algorithm=`, the refusals and
auto's choice. It reads the registry only: each backend's kernels, capability, availability and
candidates live in its own module under rcl_kernels.kernels (cpu, cuda, triton/), declared as
data (rcl_kernels.kernels.candidate).

A **candidate** is one (backend, algorithm, variant): a set of kernels with its capability, whether
it is deterministic and the device types our runs have timed it on. A backend is named by the
string `backend=`:

    "cpu", "cuda", "triton", "reference"   the backend's default candidate for the input
    "cpu:tiled", "cuda:streaming"           the backend's default variant of that algorithm
    "triton:one-pass", "cuda:mma"           one variant (names: `candidate_names()`)

RCL_KERNELS_TRITON_VARIANT and RCL_KERNELS_CUDA_VARIANT override which variant a bare
"triton"/"cuda" (or "<backend>:streaming") means, for the whole process.

Refusals list every reason (as xformers' `not_supported_reasons` does). `auto` takes the measured
winner for the input (rcl_kernels.autotune: timing on the first call, the on-disk cache, a
shipped table per GPU model, then the static order below); when no fused candidate can take an
input it warns once, naming why each backend refused, before running the N x M reference, and
raises instead when the reference would need more than REFERENCE_MEMORY_BUDGET_BYTES.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ._dtypes import FLOATING
from .kernels import cpu as _cpu
from .kernels import cuda as _cuda
from .kernels import triton as _triton
from .kernels.candidate import ALGORITHMS, Backend, Candidate, Problem

__all__ = ["ALGORITHMS", "BACKENDS", "Backend", "Candidate", "Problem", "all_candidates",
           "available_backends", "candidate_names", "find_candidate", "register_candidate",
           "resolve", "select_backend"]

REDUCTIONS = ("mean", "sum", "none")

# Above this estimate of its N x M buffers, auto refuses to fall back to the reference (an
# explicit backend="reference" still runs). 6 N x M matrices of the input dtype: logits, masks,
# weights, exponentials and their gradients (the bench's estimate, close to measured peaks).
REFERENCE_MEMORY_BUDGET_BYTES = 4 << 30
_REFERENCE_MATRICES = 6


def reference_bytes(n: int, m: int, dtype: torch.dtype) -> int:
    return _REFERENCE_MATRICES * n * m * torch.empty((), dtype=dtype).element_size()


# The registry: every backend, in the order auto's refusals name them. Each kernel backend's
# facts live in its own module under rcl_kernels.kernels; the reference is the N x M oracle.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("reference", ("cpu", "cuda"), FLOATING, lambda device: None),
        _cpu.BACKEND,
        _cuda.BACKEND,
        _triton.BACKEND,
    )
}

# Candidates registered at run time (tests' deliberately wrong kernels; rcl_kernels.selftest's
# --plugin): name -> (backend object it runs under, candidate).
_EXTRA: dict[str, tuple[Backend, Candidate]] = {}


def register_candidate(candidate: Candidate, backend: Backend | None = None) -> None:
    """Add a candidate that is not one of a backend's own (a test's stand-in): selectable by its
    name, listed by all_candidates(), never chosen by auto's static order."""
    _EXTRA[candidate.name] = (backend or BACKENDS[candidate.backend], candidate)


def all_candidates() -> list[tuple[Backend, Candidate]]:
    """Every candidate of every backend, the registered ones last."""
    return [(b, c) for b in BACKENDS.values() for c in b.candidates] + list(_EXTRA.values())


def candidate_names() -> list[str]:
    return [c.name for _, c in all_candidates()]


def find_candidate(name: str) -> tuple[Backend, Candidate]:
    """"cpu:tiled", "triton:one-pass", "reference" -> (backend, candidate); ValueError naming the
    known names otherwise."""
    for backend, candidate in all_candidates():
        if candidate.name == name:
            return backend, candidate
    raise ValueError(f"backend: expected one of {candidate_names()}, got {name!r}")


def available_backends() -> dict[str, str | None]:
    """Map each backend name to None when it works here, else to the reason it does not."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


# --------------------------------------------------------------------------------------------------
# The static order: auto's fallback when nothing measured on this machine is at hand.
# --------------------------------------------------------------------------------------------------
# Largest N·M at which the N x M reference was measured faster than every fused backend on an
# H100 (the 2026-11-26 run, docs/gpu-status.md: N = 512, M = 8,654, d = 1024, fp32: reference 2.22 ms,
# cuda 13.1 ms, triton 27.5 ms; at N = 512, M = 1,512 in fp32 and bf16 likewise). At the next
# measured size (N = 8,192, M = 9,192, d = 128, bf16) triton won (3.71 ms against 5.67 ms).
_CUDA_REFERENCE_MAX_ENTRIES = 512 * 8654
# CPU: cpu:tiled first at every shape. With the loss's gradient in its one pass it was the fastest
# candidate at every shape of the crossover (N = 256-16,384, d = 128 and 1024, fp32, forward +
# backward, BCL preset) on a 2-core AMD EPYC: at N = 256, d = 1024 19.6 ms against the
# reference's 22.8, at BCL's N = 512, d = 1024 41.7 against 50.7 (bench/results/cpu-auto-check.json).

def static_order(problem: Problem, allow_tf32: bool) -> list[str]:
    """Candidate names in the order auto tries them without measurements of this machine, fastest
    measured first."""
    entries = problem.rows * problem.columns
    if problem.device.type != "cuda":
        return ["cpu:tiled", "cpu:streaming", "triton:streaming"]
    fused = ["triton:streaming", "cuda:streaming"]
    if problem.dtype == torch.float32 and not allow_tf32:
        # fp32 "highest", N = 32,768: cuda 72.2 ms, triton 111.6 ms (same GPU run).
        fused.reverse()
    # Otherwise (bf16 at N = 8,192 to 1M, TF32 at N = 32,768) triton is 2.1-2.5x faster than cuda.
    fused.append("cuda:tiled")
    if entries <= _CUDA_REFERENCE_MAX_ENTRIES:
        return ["reference"] + fused
    return fused


# --------------------------------------------------------------------------------------------------
# Resolving backend= and algorithm=.
# --------------------------------------------------------------------------------------------------
def resolve(name: str, algorithm: str = "auto") -> tuple[Backend, Candidate | None, str]:
    """backend= and algorithm= -> (backend, its candidate or None for "choose by the input",
    the algorithm asked for). Raises ValueError naming the argument."""
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected 'auto' or one of {ALGORITHMS}, got {algorithm!r}")
    backend_name, _, selector = name.partition(":")
    if name in _EXTRA:
        backend, candidate = _EXTRA[name]
    elif backend_name not in BACKENDS or (selector == "" and ":" in name):
        raise ValueError(f"backend: expected 'auto', one of {sorted(BACKENDS)} or a candidate "
                         f"backend:variant ({', '.join(candidate_names())}), got {name!r}")
    elif not selector:
        return BACKENDS[backend_name], None, algorithm
    elif selector in ALGORITHMS and selector not in BACKENDS[backend_name].variants():
        if algorithm not in ("auto", selector):
            raise ValueError(f"algorithm={algorithm!r} contradicts backend={name!r}")
        return BACKENDS[backend_name], None, selector
    else:
        backend = BACKENDS[backend_name]
        candidate = backend.variants().get(selector)
        if candidate is None:
            raise ValueError(f"backend={name!r}: {backend_name} has the variants "
                             f"{sorted(backend.variants())} and the algorithms {ALGORITHMS}")
    if algorithm not in ("auto", candidate.algorithm):
        raise ValueError(f"algorithm={algorithm!r} contradicts backend={name!r} "
                         f"(a {candidate.algorithm} candidate)")
    return backend, candidate, algorithm


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def _describe(refusals: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in refusals.items())


def _fallback_to_reference(problem: Problem, refusals: dict[str, list[str]]) -> Candidate:
    reference = BACKENDS["reference"]
    reference_reasons = reference.not_supported_reasons(problem)
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
    return reference.candidates[0]


def eligible_candidates(problem: Problem, algorithm: str = "auto") -> tuple[list[Candidate], dict]:
    """The candidates auto may pick for `problem` (its own backends' candidates that can run it,
    with `algorithm` if one is forced, deterministic ones only under
    torch.use_deterministic_algorithms(True)), and every backend's reasons for the rest."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    eligible, refusals = [], {}
    for backend in BACKENDS.values():
        backend_reasons = backend.device_reasons(problem)
        if backend_reasons:
            refusals[backend.name] = backend_reasons
            continue
        for candidate in backend.candidates:
            if algorithm != "auto" and candidate.algorithm != algorithm:
                continue
            reasons = backend.candidate_reasons(problem, candidate)
            if deterministic and not candidate.deterministic:
                reasons.append(f"{candidate.name} is not deterministic "
                               "(torch.use_deterministic_algorithms is on)")
            if reasons:
                refusals.setdefault(backend.name, []).extend(reasons)
            else:
                eligible.append(candidate)
    return eligible, refusals


def choose_auto(problem: Problem, algorithm: str, allow_tf32: bool) -> Candidate:
    """auto's candidate for `problem`: rcl_kernels.autotune's measured or cached pick among the
    eligible candidates, else the first of the static order that can run it."""
    from . import autotune

    eligible, refusals = eligible_candidates(problem, algorithm)
    if not any(c.fused for c in eligible):
        if algorithm != "auto":
            raise ValueError(f"algorithm={algorithm!r}: no backend can run it here ({_describe(refusals)})")
        return _fallback_to_reference(problem, refusals)
    order = [_default_name(n) for n in static_order(problem, allow_tf32)]
    return autotune.choose(problem, allow_tf32, eligible, order)


def _default_name(name: str) -> str:
    """"triton:streaming" -> the name of triton's default streaming candidate here."""
    backend_name, _, selector = name.partition(":")
    if selector in ALGORITHMS:
        candidate = BACKENDS[backend_name].default_candidates().get(selector)
        return candidate.name if candidate is not None else name
    return name


def select_backend(
    name: str, algorithm: str, problem: Problem, allow_tf32: bool
) -> tuple[Candidate, str | None]:
    """(candidate, algorithm) for `name` ("auto", a backend or a backend:variant candidate) and
    `algorithm` ("auto" or one of ALGORITHMS); the algorithm is None for the reference. Raises
    ValueError naming every reason when the choice cannot run the problem."""
    if name == "auto":
        if algorithm != "auto" and algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected 'auto' or one of {ALGORITHMS}, got {algorithm!r}")
        candidate = choose_auto(problem, algorithm, allow_tf32)
        return candidate, candidate.algorithm
    backend, candidate, algorithm = resolve(name, algorithm)
    if candidate is not None:
        reasons = backend.candidate_not_supported_reasons(problem, candidate)
        if reasons:
            raise ValueError(f"backend={name!r} cannot run this input: {'; '.join(reasons)}")
        return candidate, candidate.algorithm
    reasons = backend.not_supported_reasons(problem, algorithm)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run this input: {'; '.join(reasons)}")
    if not backend.fused:
        return backend.candidates[0], None
    chosen = backend.default_algorithm(problem) if algorithm == "auto" else algorithm
    return backend.default_candidates()[chosen], chosen
