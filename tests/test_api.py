"""Public API: shapes, layouts, reductions, dtypes, modules against the functional forms, non-finite
inputs. The argument checks are in test_checks.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_kwargs, draw_labels, fresh_generator, random_features

import rcl_kernels as rk


def test_flat_and_view_layouts_agree(batch):
    features, labels, centers = batch
    flat = torch.cat(torch.unbind(features, dim=1))  # view-major
    a = rk.bcl_loss(features, labels, centers, backend="reference")
    b = rk.bcl_loss(flat, labels.repeat(2), centers, backend="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
def test_a_strided_features_view_gives_the_contiguous_result(algorithm):
    """Features that are a view with other strides are the same anchors: the fused path must
    still see its columns as the anchors themselves (one gradient, rounded once), not a copy."""
    gen = fresh_generator()
    storage = random_features((16, 40), gen).bfloat16()
    labels = draw_labels("uniform", 40, 3, gen)
    results = []
    for features in (storage.t(), storage.t().contiguous()):
        features = features.detach().requires_grad_()
        loss = rk.supcon_loss(features, labels, backend="cpu", algorithm=algorithm, reduction="none")
        loss.sum().backward()
        results.append((loss.detach(), features.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_reductions_are_consistent(batch):
    features, labels, centers = batch
    per_anchor = rk.bcl_loss(features, labels, centers, reduction="none")
    assert per_anchor.shape == (16,)
    torch.testing.assert_close(rk.bcl_loss(features, labels, centers, reduction="sum"), per_anchor.sum())
    torch.testing.assert_close(rk.bcl_loss(features, labels, centers), per_anchor.mean())


def test_mean_skips_anchors_without_positives():
    gen = fresh_generator()
    features = random_features((6, 8), gen).float().requires_grad_()
    labels = torch.tensor([0, 0, 1, 2, 3, 3])  # anchors 2 and 3 have no positive
    per_anchor = rk.supcon_loss(features, labels, reduction="none")
    assert per_anchor[2] == 0 and per_anchor[3] == 0
    torch.testing.assert_close(rk.supcon_loss(features, labels), per_anchor.sum() / 4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_no_positive_anywhere_gives_zero_and_zero_gradient(backend):
    features = random_features((5, 8), fresh_generator()).float().requires_grad_()
    loss = rk.supcon_loss(features, torch.arange(5), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_modules_match_functional(batch):
    features, labels, centers = batch
    counts = [100, 50, 10, 2]
    torch.testing.assert_close(rk.SupConLoss(0.1, 0.07)(features, labels),
                               rk.supcon_loss(features, labels, 0.1, 0.07))
    torch.testing.assert_close(rk.BalancedContrastiveLoss(0.2)(features, labels, centers),
                               rk.bcl_loss(features, labels, centers, 0.2))
    rcl = rk.RebalancedContrastiveLoss(counts, 0.1, feature_scale=1.2, tail_margin=0.2)
    torch.testing.assert_close(rcl(features, labels, centers),
                               rk.rcl_loss(features, labels, centers, counts, 0.1, 1.2, 0.2))
    logits = torch.randn(8, 4)
    torch.testing.assert_close(rk.LogitAdjustedLoss(counts, 0.5)(logits, labels),
                               rk.logit_adjusted_cross_entropy(logits, labels, counts, 0.5))


def test_available_backends_explains_each_refusal():
    status = rk.available_backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    assert status["reference"] is None
    assert status["cpu"] is None  # the test run builds the extension first
    if not torch.cuda.is_available():
        assert "CUDA" in status["cuda"]
    if os.environ.get("TRITON_INTERPRET") == "1":  # set by conftest on a machine without a GPU
        assert status["triton"] is None
        features, labels, centers = torch.randn(4, 2, 8), torch.arange(4), torch.randn(4, 8)
        torch.testing.assert_close(rk.bcl_loss(features, labels, centers, backend="triton"),
                                   rk.bcl_loss(features, labels, centers, backend="reference"))


def test_bf16_input_gives_float32_loss_and_bf16_gradients(batch):
    features, labels, centers = batch
    f16 = features.bfloat16().requires_grad_()
    loss = rk.bcl_loss(f16, labels, centers.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and f16.grad.dtype == torch.bfloat16
    # The values are those of the float64 loss on the same (rounded) inputs, to bf16 accuracy.
    f64 = f16.detach().double().requires_grad_()
    expected = rk.bcl_loss(f64, labels, centers.bfloat16().double(), backend="reference")
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(f16.grad.double(), f64.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["features", "centers"])
def test_non_finite_input_gives_nan_not_a_crash(batch, backend, bad, where):
    features, labels, centers = (t.clone() for t in batch)
    if where == "features":
        features[3, 1, 5] = bad
    else:
        centers[1, 2] = bad
    for reduction in ("mean", "sum", "none"):
        leaf = features.clone().requires_grad_()
        loss = rk.bcl_loss(leaf, labels, centers, backend=backend, reduction=reduction)
        assert torch.isnan(loss).all(), reduction
        loss.sum().backward()
        assert not torch.isfinite(leaf.grad).all(), reduction


@pytest.mark.parametrize("module", ["rcl", "la"])
def test_modules_keep_class_counts_exact_under_half(module):
    """Counts above fp16's 65,504 stay exact under .half() (in fp16 they would overflow to inf and
    give a NaN loss)."""
    counts = [100000, 50, 10, 1]
    gen = fresh_generator()
    features = random_features((8, 2, 16), gen)
    labels = draw_labels("uniform", 8, 4, gen)
    centers = random_features((4, 16), gen)
    if module == "rcl":
        loss_module = rk.RebalancedContrastiveLoss(counts, tail_margin=0.1)
        inputs = (features, labels, centers)
    else:
        loss_module = rk.LogitAdjustedLoss(counts)
        inputs = (torch.randn(8, 4, generator=gen, dtype=torch.float64), labels)
    expected = loss_module(*(t.float() if t.is_floating_point() else t for t in inputs))
    half = loss_module.half()
    assert half.class_counts.dtype == torch.int64
    assert half.class_counts.tolist() == counts
    got = half(*(t.half() if t.is_floating_point() else t for t in inputs))
    assert torch.isfinite(got)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    assert loss_module.to(torch.float64).class_counts.dtype == torch.int64


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("table", ["margins", "logit_bias"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_class_tables_give_nan_on_every_backend(batch, backend, table, bad):
    features, labels, centers = batch
    values = torch.full((4,), 0.1)
    values[labels[0]] = bad
    leaf = features.clone().requires_grad_()
    loss = rk.contrastive_loss(leaf, labels, centers, class_averaging=True, backend=backend,
                               **{table: values})
    assert torch.isnan(loss)
    loss.backward()
    assert not torch.isfinite(leaf.grad).all()


def test_huge_label_ids_cost_no_class_table_memory():
    """C inferred from the labels counts the classes present, not the largest id: a label of
    2,000,000 must not allocate 2,000,000 x d floats."""
    gen = fresh_generator()
    features = random_features((6, 2, 32), gen).float()
    labels = torch.tensor([2_000_000, 7, 7, 2_000_000, 3, 9])
    compact = torch.tensor([3, 1, 1, 3, 0, 2])
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(
            rk.supcon_loss(features, labels, backend=backend, reduction="none"),
            rk.supcon_loss(features, compact, backend=backend, reduction="none"),
        )
    with pytest.raises(ValueError, match="labels"):
        rk.supcon_loss(features, labels - 10)


@pytest.mark.parametrize("backend", ["reference", "cpu:streaming", "cpu:tiled"])
def test_autocast_does_not_change_the_loss(batch, backend):
    """The loss runs in the dtype its inputs come in, under autocast as without it, on every
    backend (the reference's matmul would otherwise run in bf16 and the kernels in fp32)."""
    features, labels, centers = batch
    kwargs = backend_kwargs(backend)
    for dtype in (torch.float32, torch.bfloat16):
        f = features.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = rk.bcl_loss(f, labels, centers.to(dtype), **kwargs)
        (grad_inside,) = torch.autograd.grad(inside, f)
        outside = rk.bcl_loss(f, labels, centers.to(dtype), **kwargs)
        (grad_outside,) = torch.autograd.grad(outside, f)
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)
        torch.testing.assert_close(grad_inside, grad_outside, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu:streaming", "cpu:tiled"])
def test_normalize_equals_normalizing_first(batch, backend):
    """normalize=True L2-normalizes features and prototypes inside, differentiably."""
    features, labels, centers = batch
    results = []
    for normalize in (True, False):
        f = (features * 5).requires_grad_()
        c = (centers * 3).requires_grad_()
        inputs = (f, c) if normalize else (F.normalize(f, dim=-1), F.normalize(c, dim=-1))
        loss = rk.bcl_loss(inputs[0], labels, inputs[1], normalize=normalize, **backend_kwargs(backend))
        results.append((loss, *torch.autograd.grad(loss, (f, c))))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)
    assert results[0][1].abs().sum() > 0


def test_logit_adjusted_weight_and_reduction_match_cross_entropy():
    gen = fresh_generator()
    logits = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    labels = draw_labels("uniform", 10, 4, gen)
    counts = [100, 50, 10, 2]
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.1
    adjusted = logits + torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    for reduction in ("mean", "sum", "none"):
        expected = F.cross_entropy(adjusted, labels, weight=weight, reduction=reduction)
        got = rk.logit_adjusted_cross_entropy(logits, labels, counts, weight=weight, reduction=reduction)
        torch.testing.assert_close(got, expected)
        module = rk.LogitAdjustedLoss(counts, weight=weight, reduction=reduction)
        torch.testing.assert_close(module(logits, labels), expected)
