"""Public API: shapes, reductions, modules, backends and every bad-input error of DESIGN §2."""

from __future__ import annotations

import pytest
import torch
from helpers import draw_labels, fresh_generator, random_features

import rcl_kernels as rk


@pytest.fixture
def batch():
    gen = fresh_generator()
    features = random_features((8, 2, 16), gen).float()
    labels = draw_labels("uniform", 8, 4, gen)
    centers = random_features((4, 16), gen).float()
    return features, labels, centers


def test_flat_and_view_layouts_agree(batch):
    features, labels, centers = batch
    flat = torch.cat(torch.unbind(features, dim=1))  # view-major
    a = rk.bcl_loss(features, labels, centers, backend="reference")
    b = rk.bcl_loss(flat, labels.repeat(2), centers, backend="reference")
    torch.testing.assert_close(a, b)


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
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_auto_picks_the_fused_cpu_backend(batch):
    features, labels, centers = batch
    from rcl_kernels import backends

    assert backends.select_backend("auto", features).name == "cpu"


def test_bf16_input_gives_float32_loss_and_bf16_gradients(batch):
    features, labels, centers = batch
    features = features.bfloat16().requires_grad_()
    loss = rk.bcl_loss(features, labels, centers.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and features.grad.dtype == torch.bfloat16


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


def bad_calls(features, labels, centers):
    """(callable, exception type, words the message must contain)."""
    f, y, c = features, labels, centers
    return [
        (lambda: rk.contrastive_loss(f[0, 0], y), ValueError, "features"),
        (lambda: rk.contrastive_loss(f.unsqueeze(0), y), ValueError, "features"),
        (lambda: rk.contrastive_loss([[1.0]], y), TypeError, "features"),
        (lambda: rk.contrastive_loss(f.long(), y), TypeError, "features"),
        (lambda: rk.contrastive_loss(f[:0], y[:0]), ValueError, "non-empty"),
        (lambda: rk.contrastive_loss(f, y[:-1]), ValueError, "labels"),
        (lambda: rk.contrastive_loss(f, y.float()), TypeError, "labels"),
        (lambda: rk.contrastive_loss(f, y[:, None]), ValueError, "labels"),
        (lambda: rk.bcl_loss(f, y + 10, c), ValueError, "labels"),
        (lambda: rk.bcl_loss(f, y - 10, c), ValueError, "labels"),
        (lambda: rk.bcl_loss(f, y, c[:, :-1]), ValueError, "prototypes"),
        (lambda: rk.bcl_loss(f, y, c.double()), TypeError, "prototypes"),
        (lambda: rk.bcl_loss(f, y, c[0]), ValueError, "prototypes"),
        (lambda: rk.contrastive_loss(f, y, temperature=0), ValueError, "temperature"),
        (lambda: rk.contrastive_loss(f, y, temperature=-1.0), ValueError, "temperature"),
        (lambda: rk.contrastive_loss(f, y, temperature="hot"), TypeError, "temperature"),
        (lambda: rk.contrastive_loss(f, y, feature_scale=0.0), ValueError, "feature_scale"),
        (lambda: rk.contrastive_loss(f, y, base_temperature=0.0), ValueError, "base_temperature"),
        (lambda: rk.contrastive_loss(f, y, reduction="avg"), ValueError, "reduction"),
        (lambda: rk.contrastive_loss(f, y, backend="fastest"), ValueError, "backend"),
        (lambda: rk.contrastive_loss(f, y, backend="cuda"), ValueError, "backend"),
        (lambda: rk.contrastive_loss(f, y, c, logit_bias=torch.zeros(3)), ValueError, "disagree"),
        (lambda: rk.contrastive_loss(f, y, logit_bias=torch.zeros(4, requires_grad=True)),
         ValueError, "logit_bias"),
        (lambda: rk.contrastive_loss(f, y, margins=torch.zeros(4, 1)), ValueError, "margins"),
        (lambda: rk.contrastive_loss(f, y, class_averaging=1), TypeError, "class_averaging"),
        (lambda: rk.contrastive_loss(f, y, num_classes=0), ValueError, "num_classes"),
        (lambda: rk.rcl_loss(f, y, c, [1, 2, 3]), ValueError, "class_counts"),
        (lambda: rk.rcl_loss(f, y, c, [1, 2, 0, 3]), ValueError, "class_counts"),
        (lambda: rk.rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=-1), ValueError, "tail_margin"),
        (lambda: rk.logit_adjusted_cross_entropy(torch.randn(8), y, [1, 2, 3, 4]), ValueError, "logits"),
        (lambda: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y[:3], [1, 2, 3, 4]),
         ValueError, "labels"),
        (lambda: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3]), ValueError,
         "class_counts"),
    ]


def test_bad_input_raises_a_named_error(batch):
    for call, error, words in bad_calls(*batch):
        with pytest.raises(error, match=words):
            call()


def test_mismatched_devices_are_named(batch):
    features, labels, centers = batch
    with pytest.raises(ValueError, match="labels"):
        rk.contrastive_loss(features, labels.to("meta"))
    with pytest.raises(ValueError, match="prototypes"):
        rk.bcl_loss(features, labels, centers.to("meta"))
