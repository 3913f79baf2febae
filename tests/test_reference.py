"""The float64 reference against independent transcriptions of the published losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import draw_labels, fresh_generator, random_features

import rcl_kernels as rk


def balscl_transcription(centers, features, targets, num_classes, temperature):
    """BCL's BalSCL.forward (Zhu et al., CVPR 2022), step by step as the authors compute it:
    two views, centers appended as columns, batch class counts that include the centers,
    a row max for stability, class-averaged denominators, mean over the 2B anchors."""
    batch = features.shape[0]
    targets = targets.view(-1, 1)
    all_targets = torch.cat([targets.repeat(2, 1), torch.arange(num_classes).view(-1, 1)], dim=0)
    batch_class_count = torch.eye(num_classes, dtype=features.dtype)[all_targets.view(-1)].sum(dim=0)
    mask = torch.eq(all_targets[: 2 * batch], all_targets.T).to(features.dtype)
    logits_mask = torch.ones_like(mask).scatter(1, torch.arange(2 * batch).view(-1, 1), 0)
    mask = mask * logits_mask
    flat = torch.cat(torch.unbind(features, dim=1), dim=0)
    columns = torch.cat([flat, centers], dim=0)
    logits = flat.mm(columns.T) / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    exp_logits = torch.exp(logits) * logits_mask
    per_instance_weight = batch_class_count[all_targets.view(-1)].view(1, -1) - mask
    exp_logits_sum = exp_logits.div(per_instance_weight).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(exp_logits_sum)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-mean_log_prob_pos).view(2, batch).mean()


def supcon_formula(features, labels, temperature, base_temperature):
    """SupCon (Khosla et al., 2020), contrast_mode "all": −(τ/τ_b)·mean_i mean_{p∈P(i)} log softmax."""
    batch, views, _ = features.shape
    flat = torch.cat(torch.unbind(features, dim=1), dim=0)
    all_labels = labels.repeat(views)
    logits = flat @ flat.T / temperature
    self_mask = torch.eye(batch * views, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    positives = (all_labels[:, None] == all_labels[None, :]) & ~self_mask
    per_anchor = (log_prob * positives).sum(1) / positives.sum(1)
    return -(temperature / base_temperature) * per_anchor.mean()


def loss_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return (loss, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("batch,num_classes,draw", [
    (1, 1, "uniform"), (1, 7, "uniform"), (2, 1, "one_class"), (5, 3, "uniform"),
    (37, 10, "longtail"), (64, 100, "few_present"), (128, 20, "longtail"),
])
def test_bcl_equals_balscl(batch, num_classes, draw):
    gen = fresh_generator()
    features = random_features((batch, 2, 16), gen)
    centers = random_features((num_classes, 16), gen)
    labels = draw_labels(draw, batch, num_classes, gen)
    ours = loss_and_grads(
        lambda f, c: rk.bcl_loss(f, labels, c, temperature=0.1, backend="reference"), features, centers
    )
    theirs = loss_and_grads(lambda f, c: balscl_transcription(c, f, labels, num_classes, 0.1), features, centers)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch,views,num_classes,draw", [
    (1, 2, 1, "uniform"), (3, 2, 5, "uniform"), (17, 3, 4, "longtail"), (64, 2, 1, "one_class"),
    (100, 2, 50, "longtail"),
])
def test_supcon_equals_formula(batch, views, num_classes, draw):
    gen = fresh_generator()
    features = random_features((batch, views, 24), gen)
    labels = draw_labels(draw, batch, num_classes, gen)
    ours = loss_and_grads(lambda f: rk.supcon_loss(f, labels, 0.07, 0.05, backend="reference"), features)
    theirs = loss_and_grads(lambda f: supcon_formula(f, labels, 0.07, 0.05), features)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rcl_tables_follow_the_documented_forms():
    """rcl_loss equals contrastive_loss with bias log π, margins m_max·(n_min/n_c)^(1/4) and
    scale α²/τ, built here by hand."""
    gen = fresh_generator()
    counts = torch.tensor([500.0, 120, 40, 9, 3])
    features = random_features((30, 2, 8), gen)
    centers = random_features((5, 8), gen)
    labels = draw_labels("longtail", 30, 5, gen)
    prior = counts.double() / counts.sum()
    by_hand = rk.contrastive_loss(
        features, labels, centers, temperature=0.2, feature_scale=1.5, class_averaging=True,
        logit_bias=prior.log(), margins=0.4 * (3.0 / counts.double()) ** 0.25, backend="reference",
    )
    preset = rk.rcl_loss(features, labels, centers, counts, temperature=0.2, feature_scale=1.5,
                         tail_margin=0.4, backend="reference")
    torch.testing.assert_close(preset, by_hand, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    gen = fresh_generator()
    features = random_features((6, 2, 5), gen).requires_grad_()
    centers = random_features((4, 5), gen).requires_grad_()
    labels = draw_labels("uniform", 6, 4, gen)
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    margins = torch.rand(4, generator=gen, dtype=torch.float64)

    def loss(f, c):
        return rk.contrastive_loss(f, labels, c, temperature=0.3, class_averaging=True,
                                   logit_bias=bias, margins=margins, backend="reference",
                                   reduction="none")

    assert torch.autograd.gradcheck(loss, (features, centers))


def test_logit_adjusted_cross_entropy_matches_definition():
    gen = fresh_generator()
    logits = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (12,), generator=gen)
    counts = [600, 300, 100, 30, 10, 6]
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    expected = F.cross_entropy(logits + 0.5 * prior.log(), labels)
    got = rk.logit_adjusted_cross_entropy(logits, labels, counts, tau=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
