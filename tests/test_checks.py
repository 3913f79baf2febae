"""rcl_kernels._checks: every bad argument of the public API raises an error naming it (DESIGN
§2), one test per bad call; the label-range check under torch.compile; the unit-norm warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import rcl_kernels as rk
from rcl_kernels import _checks


# (call with the batch's features f, labels y and centers c, exception type, words the message
# must contain), one test case each.
BAD_CALLS = [
    pytest.param(lambda f, y, c: rk.contrastive_loss(f[0, 0], y), ValueError, "features",
                 id="contrastive_loss(f[0, 0], y)"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f.unsqueeze(0), y), ValueError, "features",
                 id="contrastive_loss(f.unsqueeze(0), y)"),
    pytest.param(lambda f, y, c: rk.contrastive_loss([[1.0]], y), TypeError, "features",
                 id="contrastive_loss([[1.0]], y)"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f.long(), y), TypeError, "features",
                 id="contrastive_loss(f.long(), y)"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f[:0], y[:0]), ValueError, "non-empty",
                 id="contrastive_loss(f[:0], y[:0])"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y[:-1]), ValueError, "labels",
                 id="contrastive_loss(f, y[:-1])"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y.float()), TypeError, "labels",
                 id="contrastive_loss(f, y.float())"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y[:, None]), ValueError, "labels",
                 id="contrastive_loss(f, y[:, None])"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y + 10, c), ValueError, "labels",
                 id="bcl_loss(f, y + 10, c)"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y - 10, c), ValueError, "labels",
                 id="bcl_loss(f, y - 10, c)"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y, c[:, :-1]), ValueError, "prototypes",
                 id="bcl_loss(f, y, c[:, :-1])"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y, c.double()), TypeError, "prototypes",
                 id="bcl_loss(f, y, c.double())"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y, c[0]), ValueError, "prototypes",
                 id="bcl_loss(f, y, c[0])"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, temperature=0),
        ValueError, "temperature", id="contrastive_loss(f, y, temperature=0)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, temperature=-1.0),
        ValueError, "temperature", id="contrastive_loss(f, y, temperature=-1.0)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, temperature="hot"),
        TypeError, "temperature", id="contrastive_loss(f, y, temperature='hot')"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, feature_scale=0.0),
        ValueError, "feature_scale", id="contrastive_loss(f, y, feature_scale=0.0)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, base_temperature=0.0),
        ValueError, "base_temperature", id="contrastive_loss(f, y, base_temperature=0.0)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, reduction="avg"),
        ValueError, "reduction", id="contrastive_loss(f, y, reduction='avg')"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, backend="fastest"),
        ValueError, "backend", id="contrastive_loss(f, y, backend='fastest')"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y, backend="cuda"), ValueError, "backend",
                 id="contrastive_loss(f, y, backend='cuda')"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, c, logit_bias=torch.zeros(3)),
        ValueError, "disagree", id="contrastive_loss(f, y, c, logit_bias=torch.zeros(3))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, logit_bias=torch.zeros(4, requires_grad=True)),
        ValueError, "logit_bias", id="contrastive_loss(f, y, logit_bias=torch.zeros(4, requires_grad=True))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, margins=torch.zeros(4, 1)),
        ValueError, "margins", id="contrastive_loss(f, y, margins=torch.zeros(4, 1))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, class_averaging=1),
        TypeError, "class_averaging", id="contrastive_loss(f, y, class_averaging=1)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, num_classes=0),
        ValueError, "num_classes", id="contrastive_loss(f, y, num_classes=0)"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3]), ValueError, "class_counts",
                 id="rcl_loss(f, y, c, [1, 2, 3])"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 0, 3]), ValueError, "class_counts",
                 id="rcl_loss(f, y, c, [1, 2, 0, 3])"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=-1),
        ValueError, "tail_margin", id="rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=-1)"),
    pytest.param(
        lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8), y, [1, 2, 3, 4]),
        ValueError, "logits", id="logit_adjusted_cross_entropy(torch.randn(8), y, [1, 2, 3, 4])"),
    pytest.param(
        lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y[:3], [1, 2, 3, 4]),
        ValueError, "labels", id="logit_adjusted_cross_entropy(torch.randn(8, 4), y[:3], [1, 2, 3, 4])"),
    pytest.param(
        lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3]),
        ValueError, "class_counts", id="logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3])"),
    pytest.param(
        lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(0, 4), y[:0], [1, 2, 3, 4]),
        ValueError, "non-empty", id="logit_adjusted_cross_entropy(torch.randn(0, 4), y[:0], [1, 2, 3, 4])"),
    pytest.param(lambda f, y, c: rk.bcl_loss(f, y, None), ValueError, "centers",
                 id="bcl_loss(f, y, None)"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [1.0, float("nan"), 3.0, 4.0]),
        ValueError, "class_counts", id="rcl_loss(f, y, c, [1.0, float('nan'), 3.0, 4.0])"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [1.0, float("inf"), 3.0, 4.0]),
        ValueError, "class_counts", id="rcl_loss(f, y, c, [1.0, float('inf'), 3.0, 4.0])"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, torch.ones(4, dtype=torch.bool)),
        TypeError, "class_counts", id="rcl_loss(f, y, c, torch.ones(4, dtype=torch.bool))"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, "1234"), TypeError, "class_counts",
                 id="rcl_loss(f, y, c, '1234')"),
        # bools would read as counts of 1 and 0, also inside a list of numbers
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [True, True, True, True]),
        TypeError, "class_counts", id="rcl_loss(f, y, c, [True, True, True, True])"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [5, True, 3, 2]),
        TypeError, "class_counts.*index 1", id="rcl_loss(f, y, c, [5, True, 3, 2])"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, np.ones(4, dtype=bool)),
        TypeError, "class_counts", id="rcl_loss(f, y, c, np.ones(4, dtype=bool))"),
    pytest.param(
        lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [5, np.True_, 3, 2]),
        TypeError, "class_counts", id="logit_adjusted_cross_entropy(torch.randn(8, 4), y, [5, np.True_, 3, 2])"),
    pytest.param(
        lambda f, y, c: rk.RebalancedContrastiveLoss([10, True, 1]),
        TypeError, "class_counts", id="RebalancedContrastiveLoss([10, True, 1])"),
    pytest.param(
        lambda f, y, c: rk.LogitAdjustedLoss(torch.ones(3, dtype=torch.bool)),
        TypeError, "class_counts", id="LogitAdjustedLoss(torch.ones(3, dtype=torch.bool))"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float("nan")),
        ValueError, "tail_margin", id="rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float('nan'))"),
    pytest.param(
        lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float("inf")),
        ValueError, "tail_margin", id="rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float('inf'))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, temperature=float("nan")),
        ValueError, "temperature", id="contrastive_loss(f, y, temperature=float('nan'))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, temperature=True),
        TypeError, "temperature", id="contrastive_loss(f, y, temperature=True)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, num_classes=np.int64(0)),
        ValueError, "num_classes", id="contrastive_loss(f, y, num_classes=np.int64(0))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, num_classes=4.0),
        ValueError, "num_classes", id="contrastive_loss(f, y, num_classes=4.0)"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, logit_bias=torch.zeros(4, dtype=torch.bool)),
        TypeError, "logit_bias", id="contrastive_loss(f, y, logit_bias=torch.zeros(4, dtype=torch.bool))"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, algorithm="fastest"),
        ValueError, "algorithm", id="contrastive_loss(f, y, algorithm='fastest')"),
    pytest.param(
        lambda f, y, c: rk.contrastive_loss(f, y, backend="reference", algorithm="streaming"),
        ValueError, "algorithms", id="contrastive_loss(f, y, backend='reference', algorithm='streaming')"),
    pytest.param(
        lambda f, y, c: rk.RebalancedContrastiveLoss([10, 2.5, 1]),
        ValueError, "class_counts", id="RebalancedContrastiveLoss([10, 2.5, 1])"),
    pytest.param(lambda f, y, c: rk.LogitAdjustedLoss([10, 0, 1]), ValueError, "class_counts",
                 id="LogitAdjustedLoss([10, 0, 1])"),
    # logits that float32 cannot carry: refused, naming the argument, on every backend alike
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y, temperature=1e-38), ValueError,
                 "temperature", id="temperature=1e-38"),
    pytest.param(lambda f, y, c: rk.supcon_loss(f, y, temperature=1e-39), ValueError,
                 "temperature", id="temperature=1e-39"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], feature_scale=1e20), ValueError,
                 "feature_scale", id="feature_scale=1e20"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], feature_scale=1e200),
                 ValueError, "feature_scale", id="feature_scale=1e200"),
    pytest.param(lambda f, y, c: rk.rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=1e300), ValueError,
                 "tail_margin", id="tail_margin=1e300"),
    pytest.param(lambda f, y, c: rk.contrastive_loss(f, y, normalize=1), TypeError, "normalize",
                 id="normalize=1"),
    # BCL's BalSCL order (centers, features, targets) passed as ours (features, labels, centers)
    pytest.param(lambda f, y, c: rk.bcl_loss(c, f, y), ValueError, "BalSCL order.*bcl_loss",
                 id="bcl_loss(centers, features, targets)"),
    pytest.param(lambda f, y, c: rk.rcl_loss(c, f, y, [1, 2, 3, 4]), ValueError, "BalSCL order",
                 id="rcl_loss(centers, features, targets, counts)"),
    pytest.param(lambda f, y, c: rk.BalancedContrastiveLoss(0.1)(c, f, y), ValueError,
                 "BalSCL order", id="BalancedContrastiveLoss()(centers, features, targets)"),
    pytest.param(lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4],
                                                                  weight=torch.ones(3)),
                 ValueError, "weight", id="la_weight_of_3_for_4_classes"),
    pytest.param(lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4],
                                                                  weight=torch.ones(4, dtype=torch.long)),
                 TypeError, "weight", id="la_integer_weight"),
    pytest.param(lambda f, y, c: rk.logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4],
                                                                  reduction="avg"),
                 ValueError, "reduction", id="la_reduction_avg"),
]


@pytest.mark.parametrize("call,error,words", BAD_CALLS)
def test_bad_input_raises_a_named_error(batch, call, error, words):
    with pytest.raises(error, match=words):
        call(*batch)


def test_mismatched_devices_are_named(batch):
    features, labels, centers = batch
    with pytest.raises(ValueError, match="labels"):
        rk.contrastive_loss(features, labels.to("meta"))
    with pytest.raises(ValueError, match="prototypes"):
        rk.bcl_loss(features, labels, centers.to("meta"))


def test_numpy_scalars_are_accepted(batch):
    features, labels, centers = batch
    expected = rk.supcon_loss(features, labels, temperature=0.1, num_classes=4)
    got = rk.supcon_loss(features, labels, temperature=np.float32(0.1), num_classes=np.int64(4))
    torch.testing.assert_close(got, expected)
    counts = np.array([100, 50, 10, 2])
    torch.testing.assert_close(
        rk.rcl_loss(features, labels, centers, counts, tail_margin=np.float64(0.2)),
        rk.rcl_loss(features, labels, centers, counts.tolist(), tail_margin=0.2),
    )


def test_labels_out_of_range_are_caught_under_torch_compile(batch):
    features, labels, centers = batch
    compiled = torch.compile(lambda f, y, c: rk.bcl_loss(f, y, c, backend="cpu"), backend="aot_eager")
    compiled(features, labels, centers)
    with pytest.raises(RuntimeError, match="labels: expected class indices"):
        compiled(features, labels + 4, centers)


@pytest.fixture
def fresh_norm_warning(monkeypatch):
    """The unit-norm warning is given once per process: each test starts with it not given."""
    monkeypatch.setitem(_checks._unit_norm_warning, "given", False)


def test_features_far_from_unit_norm_warn_once(batch, fresh_norm_warning):
    features, labels, centers = batch
    with pytest.warns(UserWarning, match=r"row norms.*normalize=True") as record:
        rk.bcl_loss(features * 5, labels, centers)
    assert record[0].filename == __file__  # points at the caller, not inside the package
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="features: row norms")
        rk.bcl_loss(features * 5, labels, centers)  # once only
        rk.SupConLoss()(features * 5, labels)


@pytest.mark.parametrize("case", ["unit_norm", "normalize_true", "compiled"])
def test_no_norm_warning_where_it_is_not_due_or_not_free(batch, fresh_norm_warning, case):
    features, labels, centers = batch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="features: row norms")
        if case == "unit_norm":
            rk.bcl_loss(features, labels, centers)
        elif case == "normalize_true":
            rk.bcl_loss(features * 5, labels, centers, normalize=True)
        else:
            torch._dynamo.reset()
            compiled = torch.compile(lambda f: rk.bcl_loss(f, labels, centers, backend="cpu"),
                                     backend="aot_eager", fullgraph=True)
            compiled(features * 5)
    assert not _checks._unit_norm_warning["given"]
