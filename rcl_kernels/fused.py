"""The general op (DESIGN §1) without any N x M buffer, shared by every fused backend.

Only the weighted, masked log-sum-exp needs tiles; a backend's `Kernels` compute it and its
gradient. Everything else is O((N + M)·d) work in plain PyTorch here, where torch.compile sees it:

* class averaging and the per-class tables fold into two bias vectors, since
  log(w_ij·exp(t_ij)) = s·<z_i, k_j> + (b[l_j] − m[y_i] − log(n[y_i] − 1))  if l_j = y_i
                                      + (b[l_j] − log n[l_j])              otherwise;
* the positive term needs no tile either: Σ_{j∈Pos(i)} k_j = S_{y_i} − k_self(i), with S_c the
  sum of the columns of class c (a segment sum), so
      mean_{j∈Pos(i)} t_ij = s·<z_i, S_{y_i} − k_self(i)> / |Pos(i)| + b[y_i] − m[y_i],
  and its gradient is a segment sum too: with h_i = g_i·s / |Pos(i)| and U_c = Σ_{i: y_i=c} h_i z_i,
      dz_i −= h_i·(S_{y_i} − k_self(i)),   dk_j −= U_{l_j},   dk_self(i) += h_i z_i.

The loss is one autograd.Function around the kernels, so that the gradients of the log-sum-exp and
of the positive term meet in float32 and are rounded to the input dtype once (two half-precision
gradients of opposite sign would cancel badly). For a mean or a sum the gradient's per-anchor
weights are known before the backward, so an algorithm whose forward sees whole rows (tiled)
computes the whole loss's gradient in the forward's pass over the scores (the softmax minus the
positives' target, so the positive terms need no segment sums either) and saves it, O((N + M)·d),
instead of recomputing the scores in the backward. Second derivatives are not implemented by the kernels:
differentiating the backward raises instead of returning zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DOUBLE_BACKWARD_ERROR = (
    "rcl_kernels: the fused backends have no second derivatives (double backward: "
    "create_graph=True followed by another backward, gradient penalties, nested torch.func.grad); "
    "use backend='reference' for those"
)
VMAP_ERROR = (
    "rcl_kernels: the fused backends do not run under torch.vmap (their kernels take one batch "
    "at a time); use backend='reference' inside vmap, or call the loss per batch"
)


class ClassTables(NamedTuple):
    """The per-class constants of one call, in the accumulation dtype (no gradient)."""

    row_bias: torch.Tensor  # [N] bias of an anchor's own-class columns
    col_bias: torch.Tensor  # [M] bias of a column for anchors of other classes
    n_positive: torch.Tensor  # [N] |Pos(i)|
    positive_bias: torch.Tensor  # [N] b[y_i] − m[y_i], the bias part of the positives' mean


def class_tables(labels, col_labels, bias, margin, num_classes, class_averaging, acc, device):
    """ClassTables from the labels and the optional per-class bias and margin tables."""
    counts = torch.zeros(num_classes, dtype=acc, device=device)
    counts.index_add_(0, col_labels, torch.ones_like(col_labels, dtype=acc))
    other_class = torch.zeros(num_classes, dtype=acc, device=device) if bias is None else bias.to(acc)
    same_class = other_class if margin is None else other_class - margin.to(acc)
    positive_bias = same_class[labels]
    if class_averaging:
        other_class = other_class - torch.log(counts.clamp(min=1))
        # n[c] − 1 = 0 means the only column of class c is the anchor itself, which is masked.
        same_class = same_class - torch.log((counts - 1).clamp(min=1))
    return ClassTables(same_class[labels], other_class[col_labels], counts[labels] - 1, positive_bias)


# The glue walks N x d and M x d in chunks of this many elements, so that its float32 temporaries
# stay a few MB whatever N (at N = 32,768, d = 128 the whole-tensor form held 82 MiB above the
# inputs and gradients in forward + backward; chunked: see tests/test_memory.py).
_CHUNK_ELEMENTS = 1 << 20


def _chunks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _class_sums(k, col_labels, num_classes, acc):
    """S_c = Σ_{j: l_j = c} k_j [C, d] in the accumulation dtype."""
    sums = torch.zeros(num_classes, k.shape[1], dtype=acc, device=k.device)
    for start, end in _chunks(k.shape[0], k.shape[1]):
        sums.index_add_(0, col_labels[start:end], k[start:end].to(acc))
    return sums


def _positive_sums(class_sums, k, labels, self_offset, start, end):
    """Σ_{j∈Pos(i)} k_j = S_{y_i} − k_self(i) for the anchors start .. end − 1."""
    self_rows = k[self_offset + start : self_offset + end].to(class_sums.dtype)
    return class_sums[labels[start:end]] - self_rows


def _losses_from_positive_dots(lse, positive_dots, tables, scale):
    """L_i = lse_i − mean_{j∈Pos(i)} t_ij from Σ_{j∈Pos(i)} <z_i, k_j>, and 0 where an anchor has
    no positive."""
    positive_mean = scale * positive_dots / tables.n_positive.clamp(min=1) + tables.positive_bias
    return torch.where(tables.n_positive > 0, lse - positive_mean, torch.zeros_like(lse))


def _losses(lse, z, columns, labels, class_sums, tables, self_offset, scale):
    """The per-anchor losses, the positive dots from the class sums."""
    positive_dots = torch.cat([
        (z[start:end].to(lse.dtype) * _positive_sums(class_sums, columns, labels, self_offset,
                                                     start, end)).sum(dim=1)
        for start, end in _chunks(z.shape[0], z.shape[1])
    ]) if z.shape[0] else lse.new_zeros(0)
    return _losses_from_positive_dots(lse, positive_dots, tables, scale)


def _add_positive_gradients(dz, dk, weights, z, columns, labels, col_labels, class_sums,
                            n_positive, self_offset, scale):
    """Adds the gradients of −Σ_i weights_i·mean_{j∈Pos(i)} t_ij to the log-sum-exp's (dz, dk),
    in place, chunk by chunk."""
    if torch.is_grad_enabled():
        # A backward with create_graph=True records these ops: the kernels' outputs may be views
        # (a split buffer's first slice), which autograd does not let us update in place.
        dz, dk = dz.clone(), dk.clone()
    h = (weights * scale / n_positive.clamp(min=1))[:, None]
    weighted_class_sums = torch.zeros_like(class_sums)  # U_c = Σ_{i: y_i = c} h_i z_i
    for start, end in _chunks(z.shape[0], z.shape[1]):
        h_rows = h[start:end]
        positive = _positive_sums(class_sums, columns, labels, self_offset, start, end)
        dz[start:end].sub_(h_rows * positive)
        weighted_z = h_rows * z[start:end].to(dz.dtype)
        weighted_class_sums.index_add_(0, labels[start:end], weighted_z)
        dk[self_offset + start : self_offset + end].add_(weighted_z)
    for start, end in _chunks(dk.shape[0], dk.shape[1]):
        dk[start:end].sub_(weighted_class_sums[col_labels[start:end]])
    return dz, dk


def _input_gradients(dz, dk, z, k):
    """Round once to the input dtypes; columns that are the anchors (k None) add into dz."""
    if k is None:
        return (dz + dk).to(z.dtype), None
    return dz.to(z.dtype), dk.to(k.dtype)


class _FusedFunction(torch.autograd.Function):
    """An autograd.Function around the kernels: torch.vmap over it raises VMAP_ERROR (PyTorch's
    own message for a Function without a vmap rule names no way out)."""

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(VMAP_ERROR)


class _NoSecondDerivative(_FusedFunction):
    """A step of the backward whose own derivative raises: the kernels have no second
    derivatives, and without this a second differentiation would silently see zeros. Its inputs
    include what its result depends on (z, k), so that a double backward meets it."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class _LseBackward(_NoSecondDerivative):
    @staticmethod
    def forward(grad, z, k, labels, col_labels, row_bias, col_bias, lse, kernels, self_offset,
                scale, allow_tf32):
        return kernels.backward(grad, z, k, labels, col_labels, row_bias, col_bias, lse,
                                self_offset, scale, allow_tf32)


class _ScaleSavedGradients(_NoSecondDerivative):
    @staticmethod
    def forward(grad, dz, dk, z, k):
        return grad * dz, None if dk is None else grad * dk


class _FusedPerAnchorLoss(_FusedFunction):
    """Per-anchor losses [N] (0 where an anchor has no positive) and lse [N]. `k` is None when the
    columns are the anchors themselves (the columns' gradient then adds into the anchors')."""

    @staticmethod
    def forward(z, k, labels, col_labels, tables, kernels, self_offset, num_classes, scale,
                allow_tf32):
        columns = z if k is None else k
        lse = kernels.forward(z, columns, labels, col_labels, tables.row_bias, tables.col_bias,
                              self_offset, scale, allow_tf32)
        class_sums = _class_sums(columns, col_labels, num_classes, lse.dtype)
        losses = _losses(lse, z, columns, labels, class_sums, tables, self_offset, scale)
        return losses, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, k, labels, col_labels, tables, kernels, self_offset, num_classes, scale, allow_tf32 = inputs
        ctx.save_for_backward(z, k, labels, col_labels, tables.row_bias, tables.col_bias,
                              tables.n_positive, output[1])
        ctx.kernels, ctx.self_offset, ctx.num_classes = kernels, self_offset, num_classes
        ctx.scale, ctx.allow_tf32 = scale, allow_tf32
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_losses, _grad_lse):
        z, k, labels, col_labels, row_bias, col_bias, n_positive, lse = ctx.saved_tensors
        columns = z if k is None else k
        # Anchors without a positive have a constant loss of 0: no gradient flows from them.
        grad = torch.where(n_positive > 0, grad_losses.to(lse.dtype), torch.zeros_like(lse))
        dz, dk = _LseBackward.apply(grad.contiguous(), z, columns, labels, col_labels, row_bias,
                                    col_bias, lse, ctx.kernels, ctx.self_offset, ctx.scale,
                                    ctx.allow_tf32)
        class_sums = _class_sums(columns, col_labels, ctx.num_classes, dz.dtype)
        dz, dk = _add_positive_gradients(dz, dk, grad, z, columns, labels, col_labels, class_sums,
                                         n_positive, ctx.self_offset, ctx.scale)
        return *_input_gradients(dz, dk, z, k), None, None, None, None, None, None, None, None


def _is_unit_gradient(grad: torch.Tensor) -> bool:
    """Whether a scalar loss's upstream gradient is exactly 1 (loss.backward()): then the saved
    gradient needs no scaling pass. Read only where that costs nothing: a CPU tensor (on a GPU
    the read would sync)."""
    return grad.device.type == "cpu" and grad.numel() == 1 and grad.item() == 1.0


def _hands_over() -> bool:
    """Whether this forward can hand its gradient buffers over to the backward (see
    _FusedWeightedSum): eagerly only, since a traced graph (torch.compile) and a functorch
    transform (torch.func.grad) keep their own copies of what a backward reads."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _weighted_sum_gradients(kernels, weights, z, k, labels, col_labels, row_bias, col_bias,
                            self_offset, scale, allow_tf32):
    """The forward's (lse, positive_dots, dz, dk); dk None and added into dz when the columns are
    the anchors (k None)."""
    columns = z if k is None else k
    lse, positive_dots, dz, dk = kernels.loss_forward_backward(
        weights, z, columns, labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32)
    if k is None:  # the columns are the anchors: their gradients add up
        dz, dk = dz + dk, None
    return lse, positive_dots, dz, dk


class _FusedWeightedSum(_FusedFunction):
    """Σ_i w_i·L_i for weights w known up front (a mean or a sum). kernels.loss_forward_backward
    gives the positive dots and the whole gradient in the forward's pass, so no segment sum runs
    and the backward only scales the saved gradient.

    Eagerly the gradient buffers [N, d] and [M, d] are handed over: the backward scales them in
    place (not at all for an upstream gradient of 1) and returns them, where a scaled copy would
    be two fresh buffers (at BCL's shape 8 MB, page-faulted in on every step) and a pass over
    them. They are kept as attributes of ctx, not saved tensors, and dropped once handed over:
    the .grad they become may be edited in place, so a second backward through a retained graph
    computes them again from the inputs."""

    @staticmethod
    def forward(z, k, labels, col_labels, tables, weights, kernels, self_offset, num_classes, scale,
                allow_tf32):
        lse, positive_dots, dz, dk = _weighted_sum_gradients(
            kernels, weights, z, k, labels, col_labels, tables.row_bias, tables.col_bias,
            self_offset, scale, allow_tf32)
        losses = _losses_from_positive_dots(lse, positive_dots, tables, scale)
        # In the accumulation dtype, rounded once, after the backward's scaling.
        return (weights * losses).sum(), dz, dk

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, k, labels, col_labels, tables, weights, kernels, self_offset, _, scale, allow_tf32 = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # The saved gradients get no gradient: without this, autograd would fill an N x d and an
        # M x d tensor of zeros for them on every backward.
        ctx.set_materialize_grads(False)
        ctx.hand_over = _hands_over()
        if not ctx.hand_over:
            ctx.save_for_backward(z, k, output[1], output[2])
            return
        ctx.save_for_backward(z, k, labels, col_labels, tables.row_bias, tables.col_bias, weights)
        ctx.gradients = output[1:]
        ctx.kernels, ctx.options = kernels, (self_offset, scale, allow_tf32)

    @staticmethod
    def backward(ctx, grad, _grad_dz, _grad_dk):
        if grad is None:  # no gradient reached the loss (it is not materialized as zeros)
            return (None,) * 11
        if not ctx.hand_over:
            z, k, dz, dk = ctx.saved_tensors
        else:
            z, k, *inputs = ctx.saved_tensors
            labels, col_labels, row_bias, col_bias, weights = inputs
            if ctx.gradients is None:  # handed over by an earlier backward of a retained graph
                ctx.gradients = _weighted_sum_gradients(
                    ctx.kernels, weights, z, k, labels, col_labels, row_bias, col_bias,
                    *ctx.options)[2:]
            dz, dk = ctx.gradients
        if ctx.hand_over and not torch.is_grad_enabled():
            ctx.gradients = None
            if not _is_unit_gradient(grad):
                factor = grad.to(dz.dtype)
                dz.mul_(factor)
                if dk is not None:
                    dk.mul_(factor)
        else:
            # A traced backward, or create_graph=True: this step's derivative raises.
            dz, dk = _ScaleSavedGradients.apply(grad.to(dz.dtype), dz, dk, z, k)
        dk = None if k is None else dk.to(k.dtype)
        return dz.to(z.dtype), dk, None, None, None, None, None, None, None, None, None


def loss(kernels, z, labels, k, col_labels, *, self_offset, num_classes, scale,
         tables: ClassTables, allow_tf32: bool, reduction: str) -> torch.Tensor:
    """The loss with reduction "none" (per anchor), "sum" or "mean" (over anchors that have a
    positive), with the tiles run by `kernels` (k=None: the columns are z)."""
    has_positive = tables.n_positive > 0
    options = (self_offset, num_classes, scale, allow_tf32)
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or (k is not None and k.requires_grad))
    if reduction != "none" and needs_grad and kernels.loss_forward_backward is not None:
        weights = has_positive.to(tables.n_positive.dtype)
        if reduction == "mean":
            weights = weights / has_positive.sum().clamp(min=1)
        return _FusedWeightedSum.apply(z, k, labels, col_labels, tables, weights, kernels, *options)[0]
    losses, _ = _FusedPerAnchorLoss.apply(z, k, labels, col_labels, tables, kernels, *options)
    return reduce(losses, has_positive, reduction)


def reduce(losses: torch.Tensor, has_positive: torch.Tensor, reduction: str) -> torch.Tensor:
    """DESIGN §1's reductions of per-anchor losses (shared with the reference path)."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    # Mean over the anchors that have a positive; 0 (with zero gradient) when none has.
    return total / has_positive.sum().clamp(min=1).to(losses.dtype)
