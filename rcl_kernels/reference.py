"""The plain-PyTorch reference of the general contrastive op (DESIGN §1): the test oracle.

It materializes the N x M logits on purpose, so that every term of the definition is visible and
nothing depends on the tricks the fused kernels use (segment sums for the positives, online
log-sum-exp). All arithmetic happens in the dtype of the inputs, so that "the reference in dtype X"
measures what that dtype alone costs in accuracy.
"""

from __future__ import annotations

import torch


def per_anchor_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    k: torch.Tensor,
    col_labels: torch.Tensor,
    *,
    self_offset: int,
    num_classes: int,
    scale: float,
    bias: torch.Tensor,
    margin: torch.Tensor,
    class_averaging: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (L [N], has_positive [N]) for anchors z [N, d] against columns k [M, d].

    t_ij = scale·<z_i, k_j> + bias[l_j] − margin[y_i]·[l_j = y_i]; column i + self_offset is
    anchor i's own copy and is left out; with class averaging column j is weighted by
    1 / (n[l_j] − [l_j = y_i]), n counting labels over all M columns;
    L_i = log Σ_j w_ij·exp(t_ij) − mean_{j ∈ Pos(i)} t_ij, and 0 where Pos(i) is empty.
    """
    n, m = z.shape[0], k.shape[0]
    same_class = labels[:, None] == col_labels[None, :]
    is_self = (
        torch.arange(m, device=z.device)[None, :]
        == torch.arange(n, device=z.device)[:, None] + self_offset
    )
    positive = same_class & ~is_self
    n_positive = positive.sum(dim=1)
    has_positive = n_positive > 0

    bias = bias.to(z.dtype)
    margin = margin.to(z.dtype)
    logits = scale * (z @ k.T) + bias[col_labels][None, :] - margin[labels][:, None] * same_class

    if class_averaging:
        counts = torch.zeros(num_classes, dtype=z.dtype, device=z.device)
        counts.index_add_(0, col_labels, torch.ones_like(col_labels, dtype=z.dtype))
        denominators = counts[col_labels][None, :] - same_class.to(z.dtype)
        # A zero denominator only happens on the self column (a class whose one column is self).
        log_weights = -torch.log(denominators.clamp(min=1))
    else:
        log_weights = torch.zeros((), dtype=z.dtype, device=z.device)
    # The log-sum-exp runs over unmasked entries only; rows without positives are dropped below,
    # and get a finite stand-in so that their (discarded) gradient is not NaN.
    weighted = (logits + log_weights).masked_fill(is_self, float("-inf"))
    weighted = torch.where(has_positive[:, None], weighted, torch.zeros_like(weighted))
    lse = torch.logsumexp(weighted, dim=1)
    positive_mean = (logits * positive).sum(dim=1) / n_positive.clamp(min=1)
    losses = torch.where(has_positive, lse - positive_mean, torch.zeros_like(lse))
    return losses, has_positive
