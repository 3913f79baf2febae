"""rcl_kernels._checks: every bad argument of the public API raises an error naming it (DESIGN
§2), one test per bad call; the label-range check under torch.compile; the unit-norm warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import rcl_kernels as rk
from rcl_kernels import _checks


# (call, exception type, a pattern the message must match), one test case each: the call is a
# function of the batch's features f, labels y and centers c, written once as text (see bad_call).
BAD_CALLS = [
    ("contrastive_loss(f[0, 0], y)", ValueError, "features"),
    ("contrastive_loss(f.unsqueeze(0), y)", ValueError, "features"),
    ("contrastive_loss([[1.0]], y)", TypeError, "features"),
    ("contrastive_loss(f.long(), y)", TypeError, "features"),
    ("contrastive_loss(f[:0], y[:0])", ValueError, "non-empty"),
    ("contrastive_loss(f, y[:-1])", ValueError, "labels"),
    ("contrastive_loss(f, y.float())", TypeError, "labels"),
    ("contrastive_loss(f, y[:, None])", ValueError, "labels"),
    ("bcl_loss(f, y + 10, c)", ValueError, "labels"),
    ("bcl_loss(f, y - 10, c)", ValueError, "labels"),
    ("bcl_loss(f, y, c[:, :-1])", ValueError, "prototypes"),
    ("bcl_loss(f, y, c.double())", TypeError, "prototypes"),
    ("bcl_loss(f, y, c[0])", ValueError, "prototypes"),
    # on another device than the features
    ("contrastive_loss(f, y.to('meta'))", ValueError, "labels"),
    ("bcl_loss(f, y, c.to('meta'))", ValueError, "prototypes"),
    ("contrastive_loss(f, y, temperature=0)", ValueError, "temperature"),
    ("contrastive_loss(f, y, temperature=-1.0)", ValueError, "temperature"),
    ("contrastive_loss(f, y, temperature='hot')", TypeError, "temperature"),
    ("contrastive_loss(f, y, feature_scale=0.0)", ValueError, "feature_scale"),
    ("contrastive_loss(f, y, base_temperature=0.0)", ValueError, "base_temperature"),
    ("contrastive_loss(f, y, reduction='avg')", ValueError, "reduction"),
    ("contrastive_loss(f, y, backend='fastest')", ValueError, "backend"),
    ("contrastive_loss(f, y, backend='cuda')", ValueError, "backend"),
    ("contrastive_loss(f, y, c, logit_bias=torch.zeros(3))", ValueError, "disagree"),
    ("contrastive_loss(f, y, logit_bias=torch.zeros(4, requires_grad=True))", ValueError, "logit_bias"),
    ("contrastive_loss(f, y, margins=torch.zeros(4, 1))", ValueError, "margins"),
    ("contrastive_loss(f, y, class_averaging=1)", TypeError, "class_averaging"),
    ("contrastive_loss(f, y, num_classes=0)", ValueError, "num_classes"),
    ("rcl_loss(f, y, c, [1, 2, 3])", ValueError, "class_counts"),
    ("rcl_loss(f, y, c, [1, 2, 0, 3])", ValueError, "class_counts"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=-1)", ValueError, "tail_margin"),
    ("logit_adjusted_cross_entropy(torch.randn(8), y, [1, 2, 3, 4])", ValueError, "logits"),
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y[:3], [1, 2, 3, 4])", ValueError, "labels"),
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3])", ValueError, "class_counts"),
    ("logit_adjusted_cross_entropy(torch.randn(0, 4), y[:0], [1, 2, 3, 4])", ValueError, "non-empty"),
    ("bcl_loss(f, y, None)", ValueError, "centers"),
    ("rcl_loss(f, y, c, [1.0, float('nan'), 3.0, 4.0])", ValueError, "class_counts"),
    ("rcl_loss(f, y, c, [1.0, float('inf'), 3.0, 4.0])", ValueError, "class_counts"),
    ("rcl_loss(f, y, c, torch.ones(4, dtype=torch.bool))", TypeError, "class_counts"),
    ("rcl_loss(f, y, c, '1234')", TypeError, "class_counts"),
    # bools would read as counts of 1 and 0, also inside a list of numbers
    ("rcl_loss(f, y, c, [True, True, True, True])", TypeError, "class_counts"),
    ("rcl_loss(f, y, c, [5, True, 3, 2])", TypeError, "class_counts.*index 1"),
    ("rcl_loss(f, y, c, np.ones(4, dtype=bool))", TypeError, "class_counts"),
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y, [5, np.True_, 3, 2])", TypeError, "class_counts"),
    ("RebalancedContrastiveLoss([10, True, 1])", TypeError, "class_counts"),
    ("LogitAdjustedLoss(torch.ones(3, dtype=torch.bool))", TypeError, "class_counts"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float('nan'))", ValueError, "tail_margin"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=float('inf'))", ValueError, "tail_margin"),
    ("contrastive_loss(f, y, temperature=float('nan'))", ValueError, "temperature"),
    ("contrastive_loss(f, y, temperature=True)", TypeError, "temperature"),
    ("contrastive_loss(f, y, num_classes=np.int64(0))", ValueError, "num_classes"),
    ("contrastive_loss(f, y, num_classes=4.0)", ValueError, "num_classes"),
    ("contrastive_loss(f, y, logit_bias=torch.zeros(4, dtype=torch.bool))", TypeError, "logit_bias"),
    ("contrastive_loss(f, y, algorithm='fastest')", ValueError, "algorithm"),
    ("contrastive_loss(f, y, backend='reference', algorithm='streaming')", ValueError, "algorithms"),
    ("RebalancedContrastiveLoss([10, 2.5, 1])", ValueError, "class_counts"),
    ("LogitAdjustedLoss([10, 0, 1])", ValueError, "class_counts"),
    # logits that float32 cannot carry: refused, naming the argument, on every backend alike
    ("contrastive_loss(f, y, temperature=1e-38)", ValueError, "temperature"),
    ("supcon_loss(f, y, temperature=1e-39)", ValueError, "temperature"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], feature_scale=1e20)", ValueError, "feature_scale"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], feature_scale=1e200)", ValueError, "feature_scale"),
    ("rcl_loss(f, y, c, [1, 2, 3, 4], tail_margin=1e300)", ValueError, "tail_margin"),
    ("contrastive_loss(f, y, normalize=1)", TypeError, "normalize"),
    # BCL's BalSCL order (centers, features, targets) passed as ours (features, labels, centers)
    ("bcl_loss(c, f, y)", ValueError, "BalSCL order.*bcl_loss"),
    ("rcl_loss(c, f, y, [1, 2, 3, 4])", ValueError, "BalSCL order"),
    ("BalancedContrastiveLoss(0.1)(c, f, y)", ValueError, "BalSCL order"),
    # logit_adjusted_cross_entropy's own arguments
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4], weight=torch.ones(3))", ValueError, "weight"),
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4], weight=torch.ones(4, dtype=torch.long))", TypeError, "weight"),
    ("logit_adjusted_cross_entropy(torch.randn(8, 4), y, [1, 2, 3, 4], reduction='avg')", ValueError, "reduction"),
]


# The names a bad call may use: the public API, torch and numpy.
_CALL_NAMES = {name: getattr(rk, name) for name in rk.__all__} | {"torch": torch, "np": np}


def bad_call(call: str, error: type[Exception], words: str):
    """The test case of one row of BAD_CALLS: the call's text is its id and, evaluated as the
    body of `lambda f, y, c`, the function the test calls with the batch."""
    return pytest.param(eval(f"lambda f, y, c: {call}", _CALL_NAMES), error, words, id=call)


@pytest.mark.parametrize("call,error,words", [bad_call(*row) for row in BAD_CALLS])
def test_bad_input_raises_a_named_error(batch, call, error, words):
    with pytest.raises(error, match=words):
        call(*batch)


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
