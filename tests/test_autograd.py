"""Autograd around the fused kernels: double backward is refused (never silently zero). The
torch.compile tests are in test_compile.py."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_kwargs, backend_param, draw_labels, fresh_generator, random_features

import rcl_kernels as rk

FUSED_CPU = [backend_param("cpu:streaming"), backend_param("cpu:tiled"), backend_param("triton")]
DOUBLE_BACKWARD = "no second derivatives"


def bcl_inputs(dtype=torch.float64, batch=6, dim=5, classes=3):
    gen = fresh_generator()
    features = random_features((batch, 2, dim), gen).to(dtype)
    centers = random_features((classes, dim), gen).to(dtype)
    return features, draw_labels("uniform", batch, classes, gen), centers


def test_reference_has_second_derivatives():
    features, labels, centers = bcl_inputs()

    def loss(f, c):
        return rk.bcl_loss(f, labels, c, backend="reference")

    assert torch.autograd.gradgradcheck(
        loss, (features.requires_grad_(), centers.requires_grad_())
    )


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_fused_gradgradcheck_raises(backend):
    dtype = torch.float64 if backend.startswith("cpu") else torch.float32
    features, labels, centers = bcl_inputs(dtype)

    def loss(f, c):
        return rk.bcl_loss(f, labels, c, **backend_kwargs(backend))

    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(loss, (features.requires_grad_(), centers.requires_grad_()))


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_nested_func_grad_raises_on_fused_and_works_on_reference(backend):
    dtype = torch.float64 if backend.startswith("cpu") else torch.float32
    features, labels, centers = bcl_inputs(dtype)

    def second_derivative(spec):
        inner = torch.func.grad(lambda s: rk.bcl_loss(features * s, labels, centers, **backend_kwargs(spec)))
        return torch.func.grad(inner)(torch.tensor(1.0, dtype=dtype))

    # The reference's second derivative is the finite difference of its first derivative.
    first = torch.func.grad(lambda s: rk.bcl_loss(features * s, labels, centers, backend="reference"))
    eps = 1e-3
    finite_difference = (first(torch.tensor(1 + eps, dtype=dtype)) - first(torch.tensor(1 - eps, dtype=dtype))) / (2 * eps)
    torch.testing.assert_close(second_derivative("reference"), finite_difference, rtol=1e-3, atol=1e-3)
    assert finite_difference.abs() > 1e-2  # a zero second derivative would be no test
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        second_derivative(backend)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_gradient_penalty_raises_on_fused(backend):
    dtype = torch.float64 if backend.startswith("cpu") else torch.float32
    features, labels, centers = bcl_inputs(dtype)
    weight = torch.nn.Parameter(torch.eye(features.shape[-1], dtype=dtype))

    def penalized(spec):
        loss = rk.bcl_loss(features @ weight, labels, centers, **backend_kwargs(spec))
        (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
        return loss + 10 * grad.pow(2).sum()

    penalized("reference").backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        penalized(backend).backward()


@pytest.mark.parametrize("backend", FUSED_CPU[:2])
def test_create_graph_without_second_backward_still_gives_the_gradient(backend):
    features, labels, centers = bcl_inputs()
    f = features.clone().requires_grad_()
    loss = rk.bcl_loss(f, labels, centers, **backend_kwargs(backend))
    (grad,) = torch.autograd.grad(loss, f, create_graph=True)
    f_ref = features.clone().requires_grad_()
    (expected,) = torch.autograd.grad(rk.bcl_loss(f_ref, labels, centers, backend="reference"), f_ref)
    torch.testing.assert_close(grad, expected)
