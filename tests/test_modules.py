"""The nn.Module forms: explicit signatures (a misspelt keyword fails at construction), checks at
construction and in load_state_dict, repr() with the hyper-parameters, options forwarded."""

from __future__ import annotations

import inspect

import pytest
import torch

import rcl_kernels as rk

COUNTS = [100, 50, 10, 2]


BAD_CONSTRUCTIONS = [
    pytest.param(lambda: rk.SupConLoss(backnd="cpu"), TypeError, "backnd", id="SupConLoss(backnd)"),
    pytest.param(lambda: rk.BalancedContrastiveLoss(temprature=0.1), TypeError, "temprature",
                 id="BalancedContrastiveLoss(temprature)"),
    pytest.param(lambda: rk.RebalancedContrastiveLoss(COUNTS, reduce="sum"), TypeError, "reduce",
                 id="RebalancedContrastiveLoss(reduce)"),
    pytest.param(lambda: rk.LogitAdjustedLoss(COUNTS, weights=torch.ones(4)), TypeError, "weights",
                 id="LogitAdjustedLoss(weights)"),
    pytest.param(lambda: rk.SupConLoss(temperature=0), ValueError, "temperature", id="temperature=0"),
    pytest.param(lambda: rk.SupConLoss(temperature=1e-39), ValueError, "temperature",
                 id="temperature=1e-39"),
    pytest.param(lambda: rk.SupConLoss(reduction="avg"), ValueError, "reduction", id="reduction=avg"),
    pytest.param(lambda: rk.SupConLoss(num_classes=0), ValueError, "num_classes", id="num_classes=0"),
    pytest.param(lambda: rk.BalancedContrastiveLoss(normalize="yes"), TypeError, "normalize",
                 id="normalize=yes"),
    pytest.param(lambda: rk.RebalancedContrastiveLoss(COUNTS, feature_scale=1e20), ValueError,
                 "feature_scale", id="feature_scale=1e20"),
    pytest.param(lambda: rk.RebalancedContrastiveLoss(COUNTS, tail_margin=1e300), ValueError,
                 "tail_margin", id="tail_margin=1e300"),
    pytest.param(lambda: rk.RebalancedContrastiveLoss(COUNTS, class_averaging=1), TypeError,
                 "class_averaging", id="class_averaging=1"),
    pytest.param(lambda: rk.LogitAdjustedLoss(COUNTS, tau=float("nan")), ValueError, "tau", id="tau=nan"),
    pytest.param(lambda: rk.LogitAdjustedLoss(COUNTS, weight=torch.ones(3)), ValueError, "weight",
                 id="weight_of_3_for_4_classes"),
    pytest.param(lambda: rk.LogitAdjustedLoss(COUNTS, reduction="avg"), ValueError, "reduction",
                 id="la_reduction=avg"),
]


@pytest.mark.parametrize("construct,error,words", BAD_CONSTRUCTIONS)
def test_bad_construction_fails_at_construction(construct, error, words):
    with pytest.raises(error, match=words):
        construct()


@pytest.mark.parametrize("module", [rk.SupConLoss, rk.BalancedContrastiveLoss,
                                    rk.RebalancedContrastiveLoss, rk.LogitAdjustedLoss])
def test_signatures_are_explicit(module):
    parameters = inspect.signature(module.__init__).parameters.values()
    assert not [p for p in parameters if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def test_repr_shows_the_hyper_parameters():
    assert repr(rk.SupConLoss(0.1, backend="cpu")) == (
        "SupConLoss(temperature=0.1, base_temperature=0.07, num_classes=None, normalize=False, "
        "reduction='mean', backend='cpu', algorithm='auto')"
    )
    assert "temperature=0.2" in repr(rk.BalancedContrastiveLoss(0.2))
    rcl = repr(rk.RebalancedContrastiveLoss(COUNTS, 0.1, feature_scale=1.5, tail_margin=0.3,
                                            normalize=True))
    for shown in ("num_classes=4", "feature_scale=1.5", "tail_margin=0.3", "normalize=True"):
        assert shown in rcl
    assert repr(rk.LogitAdjustedLoss(COUNTS, 0.5, reduction="sum")) == (
        "LogitAdjustedLoss(num_classes=4, tau=0.5, weight=None, reduction='sum')"
    )


def test_options_reach_the_functional_form(batch):
    features, labels, centers = batch
    per_anchor = rk.SupConLoss(reduction="none", num_classes=4, backend="cpu", algorithm="tiled")(features, labels)
    torch.testing.assert_close(per_anchor, rk.supcon_loss(features, labels, reduction="none"))
    bcl = rk.BalancedContrastiveLoss(0.2, normalize=True, reduction="sum", backend="reference")
    torch.testing.assert_close(bcl(features * 3, labels, centers),
                               rk.bcl_loss(features, labels, centers, 0.2, reduction="sum"))
    rcl = rk.RebalancedContrastiveLoss(COUNTS, class_averaging=True, backend="cpu")
    torch.testing.assert_close(rcl(features, labels),
                               rk.rcl_loss(features, labels, None, COUNTS, class_averaging=True))


@pytest.mark.parametrize("module", ["rcl", "la"])
@pytest.mark.parametrize("counts", [
    pytest.param(torch.tensor([1.7, 2.9, 3.5, 1e30], dtype=torch.float64), id="fractions_and_1e30"),
    pytest.param(torch.tensor([5, 0, 3, 2]), id="zero"),
    pytest.param(torch.tensor([5, -3, 3, 2]), id="negative"),
    pytest.param(torch.tensor([5.0, float("nan"), 3.0, 2.0]), id="nan"),
])
def test_load_state_dict_checks_the_counts(module, counts):
    loss = rk.RebalancedContrastiveLoss(COUNTS) if module == "rcl" else rk.LogitAdjustedLoss(COUNTS)
    with pytest.raises(ValueError, match="load_state_dict: class_counts"):
        loss.load_state_dict({"class_counts": counts})
    assert loss.class_counts.tolist() == COUNTS


@pytest.mark.parametrize("module", ["rcl", "la"])
def test_load_state_dict_takes_good_counts_also_nested(module):
    make = (lambda c: rk.RebalancedContrastiveLoss(c)) if module == "rcl" else rk.LogitAdjustedLoss
    source, target = torch.nn.Sequential(make([7, 6, 5, 4])), torch.nn.Sequential(make(COUNTS))
    target.load_state_dict(source.state_dict())
    assert target[0].class_counts.tolist() == [7, 6, 5, 4]
    assert target[0].class_counts.dtype == torch.int64
    with pytest.raises(ValueError, match=r"load_state_dict: 0\.class_counts"):
        target.load_state_dict({"0.class_counts": torch.tensor([1.5, 2.0, 3.0, 4.0])})
