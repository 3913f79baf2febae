"""Every fused backend against the float64 reference, by the rule of DESIGN §4."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import (
    assert_within_rule,
    backend_kwargs,
    backend_param,
    draw_labels,
    fresh_generator,
    random_features,
)

import rcl_kernels as rk

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
        reduction=reduction, **backend_kwargs(backend), **tables,
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


@pytest.mark.parametrize("case", [c for c in CASES if c.tiny], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_triton_interpreted_matches_reference(backend, dtype, case):
    check_backend_against_reference(case, backend, dtype, "cpu")


CPU_BACKENDS = [backend_param("cpu:streaming"), backend_param("cpu:tiled")]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_matches_reference(backend, dtype, case):
    check_backend_against_reference(case, backend, dtype, "cpu")


GPU_CASES = CASES + [
    Case(2048, 2, 128, 1000, "longtail", "bcl"),
    Case(256, 2, 1024, 8142, "longtail", "bcl"),  # BCL on iNaturalist: M >> N, d = 1024
    Case(4096, 1, 128, 10, "uniform", "rcl_standalone"),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [backend_param("triton", "cuda"), backend_param("cuda", "cuda")])
def test_gpu_backends_match_reference(backend, dtype, case):
    if backend.startswith("triton") and dtype == torch.float64:
        pytest.skip("the Triton backend takes no float64")
    check_backend_against_reference(case, backend, dtype, "cuda")


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("backend", [backend_param("triton", "cuda"), backend_param("cuda", "cuda")])
def test_gpu_float32_follows_matmul_precision(backend, precision):
    """With "high" (TF32) both the reference and the backend use TF32 products, so the rule
    compares like with like."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        check_backend_against_reference(Case(1024, 2, 128, 100, "longtail", "rcl"), backend,
                                        torch.float32, "cuda")
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions_match_reference(backend, reduction):
    check_backend_against_reference(CASES[5], backend, torch.float32, "cpu", reduction)
    check_backend_against_reference(CASES[2], backend, torch.float64, "cpu", reduction)
