"""The general op (DESIGN §1) without any N x M buffer, shared by every fused backend.

Only the weighted, masked log-sum-exp needs tiles; the backend's kernels (rcl_kernels._ops)
compute it and its gradient. Everything else is O((N + M)·d) work here:

* class averaging and the per-class tables fold into two bias vectors, since
  log(w_ij·exp(t_ij)) = s·<z_i, k_j> + (b[l_j] − m[y_i] − log(n[y_i] − 1))  if l_j = y_i
                                      + (b[l_j] − log n[l_j])              otherwise;
* the positive term needs no tile either: Σ_{j∈Pos(i)} k_j = S_{y_i} − k_self(i), with S_c the
  sum of the columns of class c (a segment sum), so
      mean_{j∈Pos(i)} t_ij = s·<z_i, S_{y_i} − k_self(i)> / |Pos(i)| + b[y_i] − m[y_i],
  and its gradient is a segment sum too: with h_i = g_i·s / |Pos(i)| and U_c = Σ_{i: y_i=c} h_i z_i,
      dz_i −= h_i·(S_{y_i} − k_self(i)),   dk_j −= U_{l_j},   dk_self(i) += h_i z_i.

The whole per-anchor loss is one custom op with its own backward op, so that the gradients of the
log-sum-exp and of the positive term meet in float32 and are rounded to the input dtype once.
"""

from __future__ import annotations

import torch

from ._dtypes import accumulation_dtype
from ._ops import lse_kernels


def _class_tables(labels, col_labels, bias, margin, num_classes, class_averaging, acc):
    """(column counts per class [C], row_bias [N], col_bias [M]) in the accumulation dtype."""
    counts = torch.zeros(num_classes, dtype=acc, device=labels.device)
    counts.index_add_(0, col_labels, torch.ones_like(col_labels, dtype=acc))
    other_class = bias.to(acc)
    same_class = bias.to(acc) - margin.to(acc)
    if class_averaging:
        other_class = other_class - torch.log(counts.clamp(min=1))
        # n[c] − 1 = 0 means the only column of class c is the anchor itself, which is masked.
        same_class = same_class - torch.log((counts - 1).clamp(min=1))
    return counts, same_class[labels], other_class[col_labels]


def _positive_sums(z, k, labels, col_labels, self_offset, num_classes, acc):
    """Σ_{j∈Pos(i)} k_j for every anchor, as S_{y_i} − k_self(i)."""
    k_acc = k.to(acc)
    class_sums = torch.zeros(num_classes, k.shape[1], dtype=acc, device=k.device)
    class_sums.index_add_(0, col_labels, k_acc)
    return class_sums[labels] - k_acc[self_offset : self_offset + z.shape[0]]


@torch.library.custom_op("rcl_kernels::fused_per_anchor_loss", mutates_args=())
def fused_per_anchor_loss(
    z: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, col_labels: torch.Tensor,
    bias: torch.Tensor, margin: torch.Tensor, self_offset: int, num_classes: int, scale: float,
    class_averaging: bool, allow_tf32: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [N], has_positive [N], lse [N]); lse is kept for the backward."""
    acc = accumulation_dtype(z.dtype)
    counts, row_bias, col_bias = _class_tables(
        labels, col_labels, bias, margin, num_classes, class_averaging, acc
    )
    forward, _ = lse_kernels(backend)
    lse = forward(z, k, labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32)
    positive_sums = _positive_sums(z, k, labels, col_labels, self_offset, num_classes, acc)
    n_positive = counts[labels] - 1
    has_positive = n_positive > 0
    positive_mean = (
        scale * (z.to(acc) * positive_sums).sum(dim=1) / n_positive.clamp(min=1)
        + (bias.to(acc) - margin.to(acc))[labels]
    )
    losses = torch.where(has_positive, lse - positive_mean, torch.zeros_like(lse))
    return losses, has_positive, lse


@torch.library.custom_op("rcl_kernels::fused_per_anchor_loss_backward", mutates_args=())
def fused_per_anchor_loss_backward(
    grad_losses: torch.Tensor, z: torch.Tensor, k: torch.Tensor, labels: torch.Tensor,
    col_labels: torch.Tensor, bias: torch.Tensor, margin: torch.Tensor, lse: torch.Tensor,
    self_offset: int, num_classes: int, scale: float, class_averaging: bool, allow_tf32: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(z.dtype)
    counts, row_bias, col_bias = _class_tables(
        labels, col_labels, bias, margin, num_classes, class_averaging, acc
    )
    n_positive = counts[labels] - 1
    # Anchors without a positive have a constant loss of 0: no gradient flows from them.
    grad = torch.where(n_positive > 0, grad_losses.to(acc), torch.zeros_like(lse))
    _, backward = lse_kernels(backend)
    dz, dk = backward(
        grad.contiguous(), z, k, labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
        allow_tf32,
    )
    h = (grad * scale / n_positive.clamp(min=1))[:, None]
    z_acc = z.to(acc)
    dz = dz - h * _positive_sums(z, k, labels, col_labels, self_offset, num_classes, acc)
    weighted_class_sums = torch.zeros(num_classes, z.shape[1], dtype=acc, device=z.device)
    weighted_class_sums.index_add_(0, labels, h * z_acc)
    dk = dk - weighted_class_sums[col_labels]
    dk[self_offset : self_offset + z.shape[0]] += h * z_acc
    return dz.to(z.dtype), dk.to(k.dtype)


@fused_per_anchor_loss.register_fake
def _(z, k, labels, col_labels, bias, margin, self_offset, num_classes, scale, class_averaging,
      allow_tf32, backend):
    acc = accumulation_dtype(z.dtype)
    n = z.shape[0]
    return z.new_empty(n, dtype=acc), z.new_empty(n, dtype=torch.bool), z.new_empty(n, dtype=acc)


@fused_per_anchor_loss_backward.register_fake
def _(grad_losses, z, k, *args):
    return torch.empty_like(z), torch.empty_like(k)


class _FusedPerAnchorLoss(torch.autograd.Function):
    """Autograd of the fused op. An autograd.Function with setup_context (rather than
    register_autograd on the op) so that torch.func transforms work as for a built-in loss;
    torch.compile traces it and sees the two custom ops through their fake kernels."""

    @staticmethod
    def forward(z, k, labels, col_labels, bias, margin, *options):
        return torch.ops.rcl_kernels.fused_per_anchor_loss(
            z, k, labels, col_labels, bias, margin, *options
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, k, labels, col_labels, bias, margin, *options = inputs
        ctx.save_for_backward(z, k, labels, col_labels, bias, margin, output[2])
        ctx.options = options
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: the kernels have none
    def backward(ctx, grad_losses, _grad_has_positive, _grad_lse):
        z, k, labels, col_labels, bias, margin, lse = ctx.saved_tensors
        dz, dk = torch.ops.rcl_kernels.fused_per_anchor_loss_backward(
            grad_losses, z, k, labels, col_labels, bias, margin, lse, *ctx.options
        )
        # Labels, the per-class tables and the options are constants of the loss.
        return dz, dk, None, None, None, None, None, None, None, None, None, None


@torch.compiler.assume_constant_result
def _float32_matmul_allows_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.per_anchor_loss`, with the tiles run by `backend`'s kernels."""
    # float32 inputs follow PyTorch's matmul precision, as torch.matmul does.
    allow_tf32 = z.dtype == torch.float32 and _float32_matmul_allows_tf32()
    losses, has_positive, _ = _FusedPerAnchorLoss.apply(
        z, k, labels, col_labels, bias, margin, self_offset, num_classes, float(scale),
        class_averaging, allow_tf32, backend,
    )
    return losses, has_positive
