"""The cpu backend's loss (both algorithms) against the float64 reference: gradcheck,
torch.func, determinism, and a property test over shapes, label draws and class tables."""

from __future__ import annotations

import pytest
import torch
from helpers import draw_labels, fresh_generator, random_features
from hypothesis import given, settings
from hypothesis import strategies as st

import rcl_kernels as rk

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] is not None, reason="rcl_kernels._C not built")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
@pytest.mark.parametrize("prototypes", [True, False])
def test_gradcheck_cpu_float64(prototypes, algorithm, reduction):
    gen = fresh_generator()
    features = random_features((5, 2, 6), gen).requires_grad_()
    centers = random_features((3, 6), gen).requires_grad_()
    labels = draw_labels("uniform", 5, 3, gen)
    bias, margins = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, dtype=torch.float64)

    def loss(f, c):
        return rk.contrastive_loss(f, labels, c if prototypes else None, temperature=0.3,
                                   class_averaging=prototypes, logit_bias=bias, margins=margins,
                                   backend="cpu", algorithm=algorithm, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (features, centers))


def test_torch_func_grad_matches_autograd():
    gen = fresh_generator()
    features = random_features((16, 8), gen)
    centers = random_features((4, 8), gen)
    labels = draw_labels("uniform", 16, 4, gen)
    grad_fn = torch.func.grad(lambda f: rk.bcl_loss(f, labels, centers, backend="cpu"))
    f = features.clone().requires_grad_()
    rk.bcl_loss(f, labels, centers, backend="cpu").backward()
    torch.testing.assert_close(grad_fn(features), f.grad)


@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
def test_cpu_backend_is_deterministic(algorithm):
    """Bitwise equal run to run. The streaming kernel also across thread counts (every output
    tile has one owner); the tiled one leaves its GEMMs to MKL, whose threads may split a
    reduction, so it repeats exactly at a given thread count."""
    gen = fresh_generator()
    features = random_features((700, 2, 64), gen).float()
    centers = random_features((30, 64), gen).float()
    labels = draw_labels("longtail", 700, 30, gen)
    threads = (1, torch.get_num_threads(), 1) if algorithm == "streaming" else (1, 1, 2, 2)
    runs = []
    for count in threads:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            f, c = features.clone().requires_grad_(), centers.clone().requires_grad_()
            loss = rk.bcl_loss(f, labels, c, backend="cpu", algorithm=algorithm)
            loss.backward()
            runs.append((count, (loss, f.grad, c.grad)))
        finally:
            torch.set_num_threads(previous)
    for count, result in runs[1:]:
        reference = next(r for n, r in runs if n == count or algorithm == "streaming")
        for a, b in zip(reference, result):
            assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 24), views=st.integers(1, 3), dim=st.integers(1, 40),
    num_classes=st.integers(1, 12), draw=st.sampled_from(["uniform", "longtail", "one_class", "few_present"]),
    prototypes=st.booleans(), class_averaging=st.booleans(), with_tables=st.booleans(),
    scale=st.floats(0.5, 20.0), self_check_seed=st.integers(0, 2**31 - 1),
    algorithm=st.sampled_from(["streaming", "tiled"]), reduction=st.sampled_from(["none", "mean"]),
)
def test_property_cpu_equals_reference_float64(batch, views, dim, num_classes, draw, prototypes,
                                               class_averaging, with_tables, scale, self_check_seed,
                                               algorithm, reduction):
    gen = torch.Generator().manual_seed(self_check_seed)
    features = random_features((batch, views, dim), gen, normalize=False)
    centers = random_features((num_classes, dim), gen, normalize=False) if prototypes else None
    labels = draw_labels(draw, batch, num_classes, gen)
    kwargs = dict(temperature=1.0 / scale, class_averaging=class_averaging, num_classes=num_classes,
                  reduction=reduction)
    if with_tables:
        kwargs.update(logit_bias=torch.randn(num_classes, generator=gen, dtype=torch.float64),
                      margins=torch.rand(num_classes, generator=gen, dtype=torch.float64))
    results = []
    for backend in ({"backend": "reference"}, {"backend": "cpu", "algorithm": algorithm}):
        leaves = [features.clone().requires_grad_()] + ([centers.clone().requires_grad_()] if prototypes else [])
        loss = rk.contrastive_loss(leaves[0], labels, leaves[1] if prototypes else None,
                                   **backend, **kwargs)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64)
        grads = torch.autograd.grad((loss * weights).sum(), leaves)
        results.append((loss, *grads))
    for ours, truth in zip(results[1], results[0]):
        torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-9)
