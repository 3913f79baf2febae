"""Every fused candidate of the registry against the float64 reference, by the rule of DESIGN §4:
each variant of each backend, on each device type it runs on, in each dtype and reduction."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from helpers import (
    assert_within_rule,
    backend_param,
    draw_labels,
    fresh_generator,
    random_features,
)

import rcl_kernels as rk
from rcl_kernels import dispatch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@dataclasses.dataclass(frozen=True)
class Case:
    """One input shape and loss configuration. N = batch·views anchors, M = N (+ C prototypes)."""

    batch: int
    views: int
    dim: int
    num_classes: int
    draw: str
    preset: str  # supcon | bcl | rcl | rcl_standalone
    tiny: bool = False  # small enough for the Triton interpreter

    def __str__(self):
        return f"B{self.batch}xV{self.views}-d{self.dim}-C{self.num_classes}-{self.draw}-{self.preset}"


CASES = [
    Case(1, 1, 20, 1, "uniform", "supcon", tiny=True),  # one anchor, no column but itself
    Case(1, 2, 20, 1, "uniform", "bcl", tiny=True),
    Case(3, 1, 20, 5, "distinct", "supcon", tiny=True),  # no anchor has a positive
    Case(3, 1, 130, 5, "distinct", "bcl", tiny=True),  # only prototypes are positives
    Case(17, 1, 20, 1, "one_class", "rcl", tiny=True),  # C = 1: every column is positive
    Case(17, 2, 130, 40, "longtail", "rcl", tiny=True),
    Case(9, 2, 33, 6, "few_present", "rcl_standalone", tiny=True),
    Case(129, 1, 130, 7, "longtail", "supcon"),
    Case(64, 2, 128, 100, "few_present", "bcl"),  # most classes absent from the batch
    Case(20, 2, 64, 1000, "uniform", "rcl"),  # M >> N
    Case(1000, 1, 32, 3, "uniform", "rcl_standalone"),  # N >> M... with C small
    Case(600, 2, 20, 4, "longtail", "supcon"),  # N >> C, many positives per class
    Case(16, 2, 1024, 50, "longtail", "bcl"),  # d = 1024
]


def preset_kwargs(case: Case, counts: torch.Tensor) -> dict:
    if case.preset == "supcon":
        return {"temperature": 0.1, "base_temperature": 0.07, "num_classes": case.num_classes}
    if case.preset == "bcl":
        return {"temperature": 0.1, "class_averaging": True}
    prior = counts / counts.sum()
    tables = {
        "logit_bias": prior.log(),
        "margins": 0.3 * (counts.min() / counts) ** 0.25,
        "feature_scale": 1.25,
        "temperature": 0.2,
    }
    if case.preset == "rcl":
        return {**tables, "class_averaging": True}
    return tables  # rcl_standalone: no class averaging


def make_inputs(case: Case, generator):
    features = random_features((case.batch, case.views, case.dim), generator)
    labels = draw_labels(case.draw, case.batch, case.num_classes, generator)
    counts = torch.randint(1, 1000, (case.num_classes,), generator=generator).double()
    prototypes = None
    if case.preset in ("bcl", "rcl"):
        prototypes = random_features((case.num_classes, case.dim), generator)
    return features, labels, prototypes, preset_kwargs(case, counts)


def upstream_weights(reduction: str, anchors: int) -> torch.Tensor:
    """Fixed random weights of the loss's entries, so that every gradient entry is exercised."""
    shape = (anchors,) if reduction == "none" else ()
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def loss_and_grads(features, labels, prototypes, kwargs, backend, dtype, device, reduction="mean"):
    leaves = [features.to(device=device, dtype=dtype).requires_grad_()]
    if prototypes is not None:
        leaves.append(prototypes.to(device=device, dtype=dtype).requires_grad_())
    tables = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = rk.contrastive_loss(
        leaves[0], labels.to(device), leaves[1] if prototypes is not None else None,
        reduction=reduction, backend=backend, **tables,
    )
    weights = upstream_weights(reduction, features.shape[0] * features.shape[1])
    grads = torch.autograd.grad((loss * weights.to(loss)).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    return [loss.detach(), *grads]


def cancellation_magnitudes(kwargs, reduction: str, anchors: int) -> tuple[float, float, float]:
    """The size of the terms that cancel into the loss and into each gradient (unit features).

    The loss is a log-sum-exp minus the positives' mean, both of logit size s; a gradient row is
    s·g_i·Σ_j (p_ij − q_ij)·k_j, whose two parts are each of size s·|g_i|. When the softmax is close
    to the positives' distribution both differences are far smaller than their parts, and any
    dtype's rounding of the parts (e.g. P rounded to bf16 for a tensor-core product, as flash
    attention does) shows up relative to s and s·‖g‖, not to the small result."""
    s = kwargs.get("feature_scale", 1.0) ** 2 / kwargs["temperature"]
    weights = upstream_weights(reduction, anchors)
    loss = s * {"mean": 1.0, "sum": anchors, "none": anchors**0.5}[reduction]
    # ‖g‖ of the per-anchor upstream gradients (the mean divides by at most `anchors`).
    per_anchor = {"mean": 1 / anchors, "sum": 1.0, "none": 1.0}[reduction]
    g_norm = weights.expand(anchors).norm().item() * per_anchor
    return loss, s * g_norm, s * g_norm


def check_backend_against_reference(case, backend, dtype, device, reduction="mean"):
    gen = fresh_generator()
    features, labels, prototypes, kwargs = make_inputs(case, gen)
    # The truth sees exactly the inputs the backend sees: rounded to dtype, then widened.
    rounded = [t if t is None else t.to(dtype).double() for t in (features, prototypes)]
    truth = loss_and_grads(rounded[0], labels, rounded[1], kwargs, "reference", torch.float64, "cpu", reduction)
    low = loss_and_grads(features, labels, prototypes, kwargs, "reference", dtype, device, reduction)
    got = loss_and_grads(features, labels, prototypes, kwargs, backend, dtype, device, reduction)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    magnitudes = cancellation_magnitudes(kwargs, reduction, features.shape[0] * features.shape[1])
    for name, value, low_value, true_value, magnitude in zip(
        ("loss", "d_features", "d_prototypes"), got, low, truth, magnitudes
    ):
        assert value.dtype == low_value.dtype or name == "loss"
        assert_within_rule(f"{backend} {case} {name}", value, low_value, true_value, dtype, magnitude)


# --------------------------------------------------------------------------------------------------
# The test matrix, generated from the registry: every fused candidate of every backend, on every
# device type its backend runs on, x dtype x reduction. A candidate added to a backend shows up
# here without editing this file. Candidates registered at run time (dispatch.register_candidate:
# the self-test's deliberately wrong stand-ins) are not a backend's own and are left out.
# --------------------------------------------------------------------------------------------------
GPU_CASES = CASES + [
    Case(2048, 2, 128, 1000, "longtail", "bcl"),
    Case(256, 2, 1024, 8142, "longtail", "bcl"),  # BCL on iNaturalist: M >> N, d = 1024
    Case(4096, 1, 128, 10, "uniform", "rcl_standalone"),
]
TINY_CASES = [c for c in CASES if c.tiny]
# "sum" and "none" differ from "mean" in the glue around the kernels (the upstream weights; "none"
# runs the forward and backward kernels apart): two cases suffice, one with prototypes and
# margins across several tiles, one where no anchor has a positive.
REDUCTION_CASES = [CASES[5], CASES[2]]
# The Triton interpreter is slow (seconds per call at N = 34): the backend's non-default variants
# run these cases in one dtype on the CPU, and at full size on a GPU.
VARIANT_CASES = [CASES[5], CASES[2]]
VARIANT_REDUCTION_CASES = [CASES[2]]


def fused_candidates():
    """(backend, candidate) of every fused candidate in the registry, in its order."""
    return [(b, c) for b in dispatch.BACKENDS.values() for c in b.candidates if c.fused]


def interpreted(backend, device: str) -> bool:
    """Whether the backend's kernels run through an interpreter on `device` (Triton on the CPU)."""
    return any(m.name == "triton_interpret" for m in backend_param(backend.name, device).marks)


def plan(backend, candidate, device: str) -> tuple[list[Case], list[torch.dtype], list[Case]]:
    """(cases with reduction="mean", dtypes, cases with "sum" and "none") of one candidate on one
    device: everything natively, the tiny cases under the interpreter, fewer for the variants
    the backend does not run by default."""
    if not interpreted(backend, device):
        return (GPU_CASES if device == "cuda" else CASES), DTYPES, REDUCTION_CASES
    if candidate in backend.default_candidates().values():
        return TINY_CASES, DTYPES, REDUCTION_CASES
    return VARIANT_CASES, [backend.dtypes[0]], VARIANT_REDUCTION_CASES


def problem_of(case: Case, device: str, dtype: torch.dtype) -> dispatch.Problem:
    rows = case.batch * case.views
    columns = rows + (case.num_classes if case.preset in ("bcl", "rcl") else 0)
    return dispatch.Problem(torch.device(device), dtype, rows, columns, case.dim)


def candidate_param(backend, candidate, device, dtype, reduction, case):
    """One pytest.param, skipped with the registry's reasons where the candidate cannot run it
    here (its backend is unavailable, no such device, a refused dtype or feature size)."""
    marks = list(backend_param(candidate.name, device).marks)
    if not any(m.name == "skip" for m in marks):
        problem = problem_of(case, device, dtype)
        reasons = backend.candidate_not_supported_reasons(problem, candidate)
        if reasons:
            marks.append(pytest.mark.skip(reason=f"{candidate.name}: {'; '.join(reasons)}"))
    dtype_id = str(dtype).removeprefix("torch.")
    return pytest.param(candidate.name, device, dtype, reduction, case, marks=marks,
                        id=f"{candidate.name}-{device}-{dtype_id}-{reduction}-{case}")


def matrix_params() -> list:
    out = []
    for backend, candidate in fused_candidates():
        for device in backend.device_types:
            mean_cases, dtypes, reduction_cases = plan(backend, candidate, device)
            for dtype in dtypes:
                for reduction, cases in (("mean", mean_cases), ("sum", reduction_cases),
                                         ("none", reduction_cases)):
                    out += [candidate_param(backend, candidate, device, dtype, reduction, case)
                            for case in cases]
    return out


MATRIX = matrix_params()


@pytest.mark.parametrize("backend,device,dtype,reduction,case", MATRIX)
def test_candidate_matches_reference(backend, device, dtype, reduction, case):
    check_backend_against_reference(case, backend, dtype, device, reduction)


def test_matrix_covers_every_candidate_of_the_registry():
    """Each fused candidate of each backend is in the matrix on every device type its backend
    runs on, with every reduction there, and with every dtype (run, or skipped with the refusal)
    on at least one device: a candidate cannot drop out of the tests unnoticed."""
    reductions, dtypes = collections.defaultdict(set), collections.defaultdict(set)
    for param in MATRIX:
        name, device, dtype, reduction, _ = param.values
        reductions[name, device].add(reduction)
        dtypes[name].add(dtype)
    expected = {(c.name, device) for b in dispatch.BACKENDS.values() for c in b.candidates
                if c.fused for device in b.device_types}
    assert expected, "the registry lists no fused candidate"
    assert set(reductions) == expected
    assert all(r == set(dispatch.REDUCTIONS) for r in reductions.values()), reductions
    assert all(d >= set(DTYPES) for d in dtypes.values()), dtypes


PRECISION_CASE = Case(1024, 2, 128, 100, "longtail", "rcl")


def gpu_params() -> list:
    """Every fused candidate whose backend runs on CUDA, in float32 on PRECISION_CASE."""
    return [candidate_param(backend, candidate, "cuda", torch.float32, "mean", PRECISION_CASE)
            for backend, candidate in fused_candidates() if "cuda" in backend.device_types]


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("backend,device,dtype,reduction,case", gpu_params())
def test_gpu_float32_follows_matmul_precision(backend, device, dtype, reduction, case, precision):
    """With "high" (TF32) both the reference and the backend use TF32 products, so the rule
    compares like with like."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        check_backend_against_reference(case, backend, dtype, device, reduction)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_gpu_precision_test_covers_every_gpu_candidate():
    """Each fused candidate whose backend runs on CUDA is in the matmul-precision test."""
    names = {param.values[0] for param in gpu_params()}
    assert names == {c.name for b in dispatch.BACKENDS.values() for c in b.candidates
                     if c.fused and "cuda" in b.device_types}
