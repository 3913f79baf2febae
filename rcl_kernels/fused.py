"""The general op (DESIGN §1) computed without any N x M buffer, shared by every fused backend.

Only the weighted, masked log-sum-exp needs tiles; a backend supplies it as `lse_op` (a custom op
with its own autograd). Everything else is O((N + M)·d) work in PyTorch:

* class averaging and the per-class tables fold into two bias vectors, since
  log(w_ij·exp(t_ij)) = s·<z_i, k_j> + (b[l_j] − m[y_i] − log(n[y_i] − 1))  if l_j = y_i
                                      + (b[l_j] − log n[l_j])              otherwise;
* the positive term needs no tile either: Σ_{j∈Pos(i)} k_j = S_{y_i} − k_self(i), with S_c the
  sum of the columns of class c (a segment sum), so
  mean_{j∈Pos(i)} t_ij = s·<z_i, S_{y_i} − k_self(i)> / |Pos(i)| + b[y_i] − m[y_i].
"""

from __future__ import annotations

from typing import Callable

import torch

LseOp = Callable[..., torch.Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, LSE and sums run in float32 for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_bias_tables(
    labels: torch.Tensor,
    col_labels: torch.Tensor,
    counts: torch.Tensor,
    bias: torch.Tensor,
    margin: torch.Tensor,
    class_averaging: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_bias [N], col_bias [M]): the additive term of same-class and other-class columns."""
    other_class = bias
    same_class = bias - margin
    if class_averaging:
        other_class = other_class - torch.log(counts.clamp(min=1))
        # n[c] − 1 = 0 means the only column of class c is the anchor itself, which is masked.
        same_class = same_class - torch.log((counts - 1).clamp(min=1))
    return same_class[labels], other_class[col_labels]


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
    lse_op: LseOp,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.per_anchor_loss`, with the tiles delegated to `lse_op`."""
    n = z.shape[0]
    acc = accumulation_dtype(z.dtype)
    bias = bias.to(acc)
    margin = margin.to(acc)
    counts = torch.zeros(num_classes, dtype=acc, device=z.device)
    counts.index_add_(0, col_labels, torch.ones_like(col_labels, dtype=acc))
    row_bias, col_bias = column_bias_tables(
        labels, col_labels, counts, bias, margin, class_averaging
    )
    allow_tf32 = z.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    lse = lse_op(z, k, labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32)

    k_acc = k.to(acc)
    class_sums = torch.zeros(num_classes, k.shape[1], dtype=acc, device=z.device)
    class_sums = class_sums.index_add(0, col_labels, k_acc)
    positive_sums = class_sums[labels] - k_acc[self_offset : self_offset + n]
    n_positive = counts[labels] - 1
    has_positive = n_positive > 0
    positive_mean = (
        scale * (z.to(acc) * positive_sums).sum(dim=1) / n_positive.clamp(min=1)
        + bias[labels]
        - margin[labels]
    )
    losses = torch.where(has_positive, lse.to(acc) - positive_mean, torch.zeros_like(positive_mean))
    return losses, has_positive
