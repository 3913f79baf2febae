"""Convergence: a small model trained a few dozen SGD steps with each fused CPU algorithm follows
the reference's trajectory, within a tolerance derived from the float32 rounding of one step."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_kwargs, draw_labels, fresh_generator

import rcl_kernels as rk

STEPS, LR = 40, 0.1
BATCH, VIEWS, IN_DIM, DIM, CLASSES = 24, 2, 16, 8, 5
COUNTS = [300, 120, 50, 20, 8]


def make_problem(gen: torch.Generator):
    """Two noisy views of class-dependent inputs, long-tailed labels, and the initial weights."""
    labels = draw_labels("longtail", BATCH, CLASSES, gen)
    prototypes = torch.randn(CLASSES, IN_DIM, generator=gen, dtype=torch.float64)
    views = prototypes[labels][:, None] + 0.8 * torch.randn(BATCH, VIEWS, IN_DIM, generator=gen,
                                                             dtype=torch.float64)
    weights = {
        "projection": 0.3 * torch.randn(DIM, IN_DIM, generator=gen, dtype=torch.float64),
        "bias": 0.1 * torch.randn(DIM, generator=gen, dtype=torch.float64),
        "centers": torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64),
    }
    return views, labels, weights


def loss_fn(spec, views, labels, w):
    features = torch.nn.functional.normalize(views @ w["projection"].T + w["bias"], dim=-1)
    centers = torch.nn.functional.normalize(w["centers"], dim=-1)
    return rk.rcl_loss(features, labels, centers, COUNTS, feature_scale=1.2, tail_margin=0.2,
                       **backend_kwargs(spec))


def step_gradient(spec, views, labels, weights):
    leaves = {name: w.detach().requires_grad_() for name, w in weights.items()}
    loss = loss_fn(spec, views, labels, leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def train(spec, views, labels, weights, dtype=torch.float32):
    """Plain SGD: (the loss of every step, the final weights, the largest gradient norm)."""
    views = views.to(dtype)
    weights = {name: w.to(dtype) for name, w in weights.items()}
    losses, grad_norm = [], 0.0
    for _ in range(STEPS):
        loss, grads = step_gradient(spec, views, labels, weights)
        losses.append(loss.double())
        grad_norm = max(grad_norm, flat(grads).norm().item())
        weights = {name: w - LR * grads[name] for name, w in weights.items()}
    return torch.stack(losses), weights, grad_norm


def flat(weights) -> torch.Tensor:
    return torch.cat([w.double().flatten() for w in weights.values()])


@pytest.mark.parametrize("algorithm", ["cpu:streaming", "cpu:tiled"])
def test_fused_training_follows_the_reference(algorithm):
    gen = fresh_generator()
    views, labels, weights = make_problem(gen)
    # The float32 rounding of one step, measured at the start against the float64 reference:
    # the update error delta_w = LR·‖g32 − g64‖ and the loss error delta_l = |L32 − L64|, for each
    # of the two trajectories compared.
    loss64, grads64 = step_gradient("reference", views, labels, weights)
    delta_w = delta_l = 0.0
    for spec in ("reference", algorithm):
        loss32, grads32 = step_gradient(spec, views.float(), labels,
                                        {name: w.float() for name, w in weights.items()})
        delta_w = max(delta_w, LR * (flat(grads32) - flat(grads64)).norm().item())
        delta_l = max(delta_l, abs(loss32.double() - loss64).item())
    # Derivation. Each trajectory's step t adds a rounding error of about delta_w to its weights.
    # While LR is below 2 / (the gradient's Lipschitz constant) an SGD step does not amplify a
    # weight difference, so after T steps each trajectory is within T·delta_w of the exact one and
    # the two within 2·T·delta_w of each other. The losses then differ by at most
    # G·2·T·delta_w + 2·delta_l, G the largest gradient norm. A factor 4 covers steps that amplify
    # a little (the loss is not convex) and rounding errors larger than those of the first step.
    ref_losses, ref_weights, max_grad = train("reference", views, labels, weights)
    losses, final, _ = train(algorithm, views, labels, weights)
    tolerance_w = 4 * 2 * STEPS * delta_w
    tolerance_l = 4 * (max_grad * 2 * STEPS * delta_w + 2 * delta_l)
    weight_gap = (flat(final) - flat(ref_weights)).norm().item()
    assert weight_gap <= tolerance_w, f"weights {weight_gap:.3e} > {tolerance_w:.3e}"
    loss_gap = (losses - ref_losses).abs().max().item()
    assert loss_gap <= tolerance_l, f"losses {loss_gap:.3e} > {tolerance_l:.3e}"
    # Not vacuous: training moved the weights far beyond the tolerance and lowered the loss.
    assert (flat(ref_weights) - flat(weights)).norm().item() > 100 * tolerance_w
    assert ref_losses[-1] < ref_losses[0] - 0.1
