"""The custom ops: opcheck, gradcheck, torch.compile, determinism and property tests (CPU op)."""

from __future__ import annotations

import pytest
import torch
from helpers import draw_labels, fresh_generator, random_features
from hypothesis import given, settings
from hypothesis import strategies as st

import rcl_kernels as rk
from rcl_kernels import fused

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] is not None, reason="rcl_kernels._C not built")


def op_inputs(n=12, d=10, num_classes=4, prototypes=True, dtype=torch.float64, requires_grad=True):
    gen = fresh_generator()
    z = random_features((n, d), gen).to(dtype)
    labels = draw_labels("uniform", n, num_classes, gen)
    k, col_labels = z, labels
    if prototypes:
        k = torch.cat([z, random_features((num_classes, d), gen).to(dtype)])
        col_labels = torch.cat([labels, torch.arange(num_classes)])
    k = k.detach().clone().requires_grad_(requires_grad)
    z = z.detach().clone().requires_grad_(requires_grad)
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(fused.accumulation_dtype(dtype))
    margin = torch.rand(num_classes, generator=gen, dtype=torch.float64).to(bias.dtype)
    return z, k, labels, col_labels, bias, margin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("class_averaging", [True, False])
def test_opcheck_fused_per_anchor_loss(dtype, class_averaging):
    # Its autograd is an autograd.Function around the op (see rcl_kernels.fused), not the op's own.
    z, k, labels, col_labels, bias, margin = op_inputs(dtype=dtype, requires_grad=False)
    args = (z, k, labels, col_labels, bias, margin, 0, 4, 7.5, class_averaging, False, "cpu")
    torch.library.opcheck(torch.ops.rcl_kernels.fused_per_anchor_loss.default, args)
    lse = torch.ops.rcl_kernels.fused_per_anchor_loss(*args)[2]
    grad = torch.rand_like(lse)
    torch.library.opcheck(torch.ops.rcl_kernels.fused_per_anchor_loss_backward.default,
                          (grad, z, k, labels, col_labels, bias, margin, lse, *args[6:]))


def test_opcheck_masked_lse_ops():
    z, k, labels, col_labels, bias, _ = op_inputs(requires_grad=False)
    row_bias, col_bias = bias[labels], bias[col_labels]
    fwd_args = (z, k, labels, col_labels, row_bias, col_bias, 0, 3.0, False)
    torch.library.opcheck(torch.ops.rcl_kernels.masked_lse_forward.default, fwd_args)
    lse = torch.ops.rcl_kernels.masked_lse_forward(*fwd_args)
    bwd_args = (torch.rand_like(lse), z, k, labels, col_labels, row_bias, col_bias, lse, 0, 3.0, False)
    torch.library.opcheck(torch.ops.rcl_kernels.masked_lse_backward.default, bwd_args)


@pytest.mark.parametrize("prototypes", [True, False])
def test_gradcheck_cpu_float64(prototypes):
    gen = fresh_generator()
    features = random_features((5, 2, 6), gen).requires_grad_()
    centers = random_features((3, 6), gen).requires_grad_()
    labels = draw_labels("uniform", 5, 3, gen)
    bias, margins = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, dtype=torch.float64)

    def loss(f, c):
        return rk.contrastive_loss(f, labels, c if prototypes else None, temperature=0.3,
                                   class_averaging=prototypes, logit_bias=bias, margins=margins,
                                   backend="cpu", reduction="none")

    assert torch.autograd.gradcheck(loss, (features, centers))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    gen = fresh_generator()
    features = random_features((32, 2, 16), gen).float()
    centers = random_features((10, 16), gen).float()
    labels = draw_labels("longtail", 32, 10, gen)
    counts = torch.arange(10, 0, -1).double() * 30

    def step(f, c):
        return rk.rcl_loss(f, labels, c, counts, tail_margin=0.2, feature_scale=1.1, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    results = []
    for fn in (step, compiled):
        f = features.clone().requires_grad_()
        c = centers.clone().requires_grad_()
        loss = fn(f, c)
        loss.backward()
        results.append((loss, f.grad, c.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_torch_func_grad_matches_autograd():
    gen = fresh_generator()
    features = random_features((16, 8), gen)
    centers = random_features((4, 8), gen)
    labels = draw_labels("uniform", 16, 4, gen)
    grad_fn = torch.func.grad(lambda f: rk.bcl_loss(f, labels, centers, backend="cpu"))
    f = features.clone().requires_grad_()
    rk.bcl_loss(f, labels, centers, backend="cpu").backward()
    torch.testing.assert_close(grad_fn(features), f.grad)


def test_cpu_backend_is_deterministic():
    gen = fresh_generator()
    features = random_features((700, 2, 64), gen).float()
    centers = random_features((30, 64), gen).float()
    labels = draw_labels("longtail", 700, 30, gen)
    runs = []
    for threads in (1, torch.get_num_threads(), 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            f, c = features.clone().requires_grad_(), centers.clone().requires_grad_()
            loss = rk.bcl_loss(f, labels, c, backend="cpu")
            loss.backward()
            runs.append((loss, f.grad, c.grad))
        finally:
            torch.set_num_threads(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 24), views=st.integers(1, 3), dim=st.integers(1, 40),
    num_classes=st.integers(1, 12), draw=st.sampled_from(["uniform", "longtail", "one_class", "few_present"]),
    prototypes=st.booleans(), class_averaging=st.booleans(), with_tables=st.booleans(),
    scale=st.floats(0.5, 20.0), self_check_seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu_equals_reference_float64(batch, views, dim, num_classes, draw, prototypes,
                                               class_averaging, with_tables, scale, self_check_seed):
    gen = torch.Generator().manual_seed(self_check_seed)
    features = random_features((batch, views, dim), gen, normalize=False)
    centers = random_features((num_classes, dim), gen, normalize=False) if prototypes else None
    labels = draw_labels(draw, batch, num_classes, gen)
    kwargs = dict(temperature=1.0 / scale, class_averaging=class_averaging, num_classes=num_classes,
                  reduction="none")
    if with_tables:
        kwargs.update(logit_bias=torch.randn(num_classes, generator=gen, dtype=torch.float64),
                      margins=torch.rand(num_classes, generator=gen, dtype=torch.float64))
    results = []
    for backend in ("reference", "cpu"):
        leaves = [features.clone().requires_grad_()] + ([centers.clone().requires_grad_()] if prototypes else [])
        loss = rk.contrastive_loss(leaves[0], labels, leaves[1] if prototypes else None,
                                   backend=backend, **kwargs)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64)
        grads = torch.autograd.grad((loss * weights).sum(), leaves)
        results.append((loss, *grads))
    for ours, truth in zip(results[1], results[0]):
        torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-9)
