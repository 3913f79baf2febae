"""Autograd around the fused kernels: double backward is refused (never silently zero), and
torch.compile traces every preset with and without gradients, static and dynamic (issue 9)."""

from __future__ import annotations

import functools

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


PRESETS = {
    "supcon": lambda f, y, c, counts, **kw: rk.supcon_loss(f, y, num_classes=c.shape[0], **kw),
    "bcl": lambda f, y, c, counts, **kw: rk.bcl_loss(f, y, c, **kw),
    "rcl": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, c, counts, **kw),
    "rcl_margin": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, c, counts, tail_margin=0.2,
                                                              feature_scale=1.1, **kw),
    "rcl_standalone": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, None, counts, **kw),
}
COMPILE_MODES = {
    "fullgraph": dict(fullgraph=True),
    "default": dict(),
    "dynamic": dict(dynamic=True),
}


@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("preset", PRESETS)
def test_torch_compile_every_preset(preset, grad, mode, algorithm):
    gen = fresh_generator()
    features = random_features((24, 2, 16), gen).float()
    centers = random_features((6, 16), gen).float()
    labels = draw_labels("longtail", 24, 6, gen)
    counts = torch.arange(6, 0, -1).double() * 40
    loss_fn = functools.partial(PRESETS[preset], backend="cpu", algorithm=algorithm)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", **COMPILE_MODES[mode])

    def run(fn):
        f, c = features.clone().requires_grad_(grad), centers.clone().requires_grad_(grad)
        if not grad:
            with torch.no_grad():
                return (fn(f, labels, c, counts),)
        loss = fn(f, labels, c, counts)
        loss.backward()
        return loss, f.grad, c.grad

    for eager, traced in zip(run(loss_fn), run(compiled)):
        if eager is None:  # the standalone preset has no centers gradient
            assert traced is None
        else:
            torch.testing.assert_close(traced, eager)


def test_torch_compile_inductor_fullgraph():
    gen = fresh_generator()
    features = random_features((32, 2, 16), gen).float()
    centers = random_features((10, 16), gen).float()
    labels = draw_labels("longtail", 32, 10, gen)
    counts = torch.arange(10, 0, -1).double() * 30
    step = functools.partial(PRESETS["rcl_margin"], backend="cpu", algorithm="tiled")
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for fn in (step, compiled):
        f, c = features.clone().requires_grad_(), centers.clone().requires_grad_()
        loss = fn(f, labels, c, counts)
        loss.backward()
        results.append((loss, f.grad, c.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_torch_compile_dynamic_with_symbolic_float_arguments():
    """Temperature and feature scale as inputs of a dynamic compiled function, with floats left
    symbolic: the argument checks must not need concrete values."""
    gen = fresh_generator()
    features = random_features((16, 2, 8), gen).float()
    centers = random_features((4, 8), gen).float()
    labels = draw_labels("uniform", 16, 4, gen)

    def step(f, temperature, scale):
        return rk.rcl_loss(f, labels, centers, [5, 4, 3, 2], temperature=temperature,
                           feature_scale=scale, tail_margin=0.1, backend="cpu")

    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=False):
        compiled = torch.compile(step, dynamic=True, backend="aot_eager")
        for temperature in (0.1, 0.3):
            torch.testing.assert_close(compiled(features, temperature, 1.1), step(features, temperature, 1.1))


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("preset", ["bcl", "rcl_margin"])
@pytest.mark.parametrize("backend", [backend_param("triton", "cuda"),
                                     backend_param("cuda:streaming", "cuda"),
                                     backend_param("cuda:tiled", "cuda")])
def test_torch_compile_gpu_backends(backend, preset, grad):
    """torch.compile(fullgraph=True) through the GPU kernels, with and without gradients."""
    gen = fresh_generator()
    features = random_features((64, 2, 32), gen).float().cuda()
    centers = random_features((6, 32), gen).float().cuda()
    labels = draw_labels("longtail", 64, 6, gen).cuda()
    counts = (torch.arange(6, 0, -1) * 40).cuda()
    loss_fn = functools.partial(PRESETS[preset], **backend_kwargs(backend))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)

    def run(fn):
        f, c = features.clone().requires_grad_(grad), centers.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            loss = fn(f, labels, c, counts)
        if not grad:
            return (loss,)
        loss.backward()
        return loss, f.grad, c.grad

    for eager, traced in zip(run(loss_fn), run(compiled)):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)
