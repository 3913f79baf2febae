"""Public functional API: the general contrastive loss (DESIGN §1) and its presets.

Each preset documents where its choices come from; the table in README.md sums them up.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from . import fused, reference
from ._dtypes import accumulation_dtype
from ._checks import (
    check_argument_order,
    check_class_counts,
    check_class_table,
    check_class_weight,
    check_label_range,
    check_logit_scale,
    check_logit_term,
    check_nonnegative_number,
    check_positive_int,
    check_positive_number,
    check_prototypes,
    check_real_number,
    check_reduction,
    check_same_device,
    check_labels,
    check_tensor,
    flatten_views,
    refuse_jit_trace,
    warn_once_if_not_unit_norm,
)
from .dispatch import Problem, select_backend
from .distributed import gather_anchors


def _class_count_and_column_labels(num_classes, prototypes, tables, all_labels):
    """(C, column labels of the anchors) from num_classes, the prototypes or a per-class table,
    all of which must agree. Without any of them C is read from the labels (eager only: it waits
    for their values), and the labels are renumbered 0..C-1 over the classes present, so that a
    huge label id costs no C x d memory (absent classes contribute nothing without prototypes)."""
    claims = {}
    if num_classes is not None:
        claims["num_classes"] = check_positive_int("num_classes", num_classes)
    if prototypes is not None:
        claims["prototypes"] = prototypes.shape[0]
    claims.update({name: table.shape[0] for name, table in tables.items() if table is not None})
    if claims:
        # Compared pairwise, not through a set: under torch.compile with dynamic shapes a size is
        # symbolic, and two sizes that are equal at run time are not equal as hashed objects.
        first = next(iter(claims.values()))
        if any(size != first for size in claims.values()):
            raise ValueError(f"num_classes: the class counts implied by the arguments disagree: {claims}")
        return first, all_labels
    if torch.compiler.is_compiling():
        raise ValueError(
            "num_classes: under torch.compile pass num_classes=, prototypes or a per-class table "
            "(inferring it from the labels would read their values)"
        )
    if int(all_labels.min()) < 0:
        raise ValueError(f"labels: expected class indices >= 0, got {int(all_labels.min())}")
    present, renumbered = torch.unique(all_labels, return_inverse=True)
    return present.numel(), renumbered


@torch.compiler.assume_constant_result
def _float32_matmul_allows_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def _autocast_disabled(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _backend_loss(candidate, algorithm, anchors, anchor_labels, columns, column_labels, *, self_offset,
                  num_classes, scale, logit_bias, margins, class_averaging, allow_tf32, reduction):
    """The reduced loss from `candidate`'s kernels (fused) or the N x M reference formula, in the
    accumulation dtype."""
    if candidate.fused:
        tables = fused.class_tables(anchor_labels, column_labels, logit_bias, margins, num_classes,
                                    class_averaging, accumulation_dtype(anchors.dtype), anchors.device)
        loss = fused.loss(
            candidate.kernels[algorithm], anchors, anchor_labels,
            None if columns is anchors else columns.contiguous(), column_labels,
            self_offset=self_offset, num_classes=num_classes, scale=scale, tables=tables,
            allow_tf32=allow_tf32, reduction=reduction,
        )
    else:
        zeros = torch.zeros(num_classes, dtype=anchors.dtype, device=anchors.device)
        losses, has_positive = reference.per_anchor_loss(
            anchors, anchor_labels, columns, column_labels, self_offset=self_offset,
            num_classes=num_classes, scale=scale,
            bias=zeros if logit_bias is None else logit_bias,
            margin=zeros if margins is None else margins,
            class_averaging=class_averaging,
        )
        loss = fused.reduce(losses, has_positive, reduction)
    return loss.to(accumulation_dtype(anchors.dtype))


def _column_labels(all_labels: torch.Tensor, num_prototypes: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The columns' labels in `dtype`: the gathered anchors' labels, then 0 .. num_prototypes − 1
    for the prototypes. int32 is exact here (check_label_range put every label in [0, C)).

    Launches, per forward only (the backward reuses the labels the forward saved): int64, as the
    labels come, costs 0 without prototypes and 2 with them (arange, cat). int32 costs 1 without
    prototypes (the narrowing copy) and still 2 with them: one converting copy of the anchors'
    labels into the column buffer and an arange written into its tail, so BCL's shape pays no
    extra launch. What it saves: with int64 labels every logit of the forward, dz and dk
    kernels compares 64 bits (two 32-bit compares, and the label registers twice as many): at
    N = 512, M = 1,512 that is 3·N·M ≈ 2.3 M extra compares per step, and it is what takes the
    fp32 dk kernel past 255 registers into spills (sm_90)."""
    if num_prototypes == 0:
        return all_labels.to(dtype)
    if dtype == all_labels.dtype:
        prototype_labels = torch.arange(num_prototypes, device=all_labels.device, dtype=dtype)
        return torch.cat([all_labels, prototype_labels])
    n = all_labels.shape[0]
    labels = torch.empty(n + num_prototypes, device=all_labels.device, dtype=dtype)
    labels[:n].copy_(all_labels)
    torch.arange(num_prototypes, out=labels[n:])
    return labels


def _non_finite_poison(*tensors: torch.Tensor | None) -> torch.Tensor:
    """NaN when any entry is NaN or ±Inf, else 0, on the device, without a sync: the one place
    that decides what a non-finite input gives (a NaN loss and NaN gradients, on every backend;
    an Inf could otherwise just drop a column, or survive as ±Inf)."""
    # A tensor's min and max are finite exactly when all its entries are (both propagate NaN):
    # one read of each tensor, where isfinite().all() writes and reads a mask (25x slower).
    extremes = [value.reshape(1) for t in tensors if t is not None and t.numel() > 0
                for value in torch.aminmax(t.detach())]
    if not extremes:
        return torch.zeros(())
    return torch.where(torch.isfinite(torch.cat(extremes)).all(), 0.0, float("nan"))


def contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    feature_scale: float = 1.0,
    class_averaging: bool = False,
    logit_bias: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    base_temperature: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    algorithm: str = "auto",
    process_group=None,
    num_classes: int | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """The general class-balanced supervised contrastive loss of DESIGN §1.

    features: [B, V, d] with labels [B] (views flattened view-major), or [N, d] with labels [N].
    prototypes: optional [C, d] class prototypes, appended as columns with labels 0..C-1.
    The logit of anchor i and column j is
        feature_scale² / temperature · <z_i, k_j> + logit_bias[l_j] − margins[y_i]·[l_j = y_i],
    class_averaging weights column j by 1 / (n[l_j] − [l_j = y_i]) (BCL), and the result is
    multiplied by temperature / base_temperature when base_temperature is given (SupCon).
    Anchors without a positive contribute nothing; "mean" averages over those that have one.
    logit_bias and margins are constants (not differentiated). The result is float32 for
    float32/bfloat16/float16 features and float64 for float64 features; a NaN or ±Inf in the
    features, prototypes, logit_bias or margins makes it NaN.
    backend: "auto", "reference", "cpu", "triton" or "cuda" (see rk.available_backends()).
    algorithm: "auto", "streaming" (flash-style kernels) or "tiled" (a GEMM per block of rows
    into a bounded workspace): which algorithm a fused backend runs.
    process_group: contrast local anchors with the anchors of every rank (rcl_kernels.distributed).
    num_classes: C when neither prototypes nor a per-class table gives it (needed under
    torch.compile); otherwise inferred from the labels.
    normalize: L2-normalize the features and the prototypes (differentiably) before the loss, as
    pytorch-metric-learning's losses do. Without it the losses expect unit-norm rows; for CPU
    tensors in eager mode a warning says so once when some row's norm is outside [0.5, 2] (on a
    GPU and under torch.compile that would cost a sync, so nothing is checked there).
    Refused: a logit scale feature_scale**2 / temperature above float32's reach
    (_checks.LOGIT_LIMIT), and torch.jit.trace (use torch.compile or torch.export).
    """
    refuse_jit_trace()
    check_argument_order(features, labels, prototypes)
    anchors, anchor_labels = flatten_views(features, labels, allow_empty=process_group is not None)
    prototypes = check_prototypes(prototypes, features)
    logit_bias = check_class_table("logit_bias", logit_bias, features, None)
    margins = check_class_table("margins", margins, features, None)
    temperature = check_positive_number("temperature", temperature)
    feature_scale = check_positive_number("feature_scale", feature_scale)
    scale = check_logit_scale(temperature, feature_scale)
    base_temperature = check_positive_number("base_temperature", base_temperature, allow_none=True)
    check_reduction(reduction)
    for name, flag in (("class_averaging", class_averaging), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if normalize:
        anchors = F.normalize(anchors, dim=-1)
        prototypes = None if prototypes is None else F.normalize(prototypes, dim=-1)
    else:
        warn_once_if_not_unit_norm(anchors)

    # Once, here: the fused path knows the columns are the anchors by identity (one gradient,
    # rounded once), which a later copy of the anchors alone would break.
    anchors = anchors.contiguous()
    all_anchors, all_labels, self_offset = gather_anchors(anchors, anchor_labels, process_group)
    num_classes, all_labels = _class_count_and_column_labels(
        num_classes, prototypes, {"logit_bias": logit_bias, "margins": margins}, all_labels
    )
    check_label_range(all_labels, num_classes)

    columns = all_anchors if prototypes is None else torch.cat([all_anchors, prototypes])
    # float32 inputs follow PyTorch's matmul precision, as torch.matmul does.
    allow_tf32 = anchors.dtype == torch.float32 and _float32_matmul_allows_tf32()
    needs_grad = torch.is_grad_enabled() and (anchors.requires_grad or columns.requires_grad)
    problem = Problem(anchors.device, anchors.dtype, anchors.shape[0], columns.shape[0],
                      anchors.shape[1], reduction, needs_grad)
    candidate, algorithm = select_backend(backend, algorithm, problem, allow_tf32)
    label_dtype = candidate.kernels[algorithm].label_dtype if candidate.fused else torch.int64
    column_labels = _column_labels(all_labels, num_classes if prototypes is not None else 0,
                                   label_dtype)
    # The columns start with the gathered anchors: the anchors' labels are a view.
    anchor_labels = column_labels[self_offset : self_offset + anchors.shape[0]]
    # The loss runs in the dtype of its inputs whatever autocast says, on every backend alike (the
    # reference's matmul would otherwise be autocast and the kernels would not).
    with _autocast_disabled(anchors.device.type):
        loss = _backend_loss(
            candidate, algorithm, anchors, anchor_labels, columns, column_labels,
            self_offset=self_offset, num_classes=num_classes, scale=scale,
            logit_bias=logit_bias, margins=margins, class_averaging=class_averaging,
            allow_tf32=allow_tf32, reduction=reduction,
        )
    # A factor of exactly 1 (or NaN) rather than a selection: the gradient still flows, and comes
    # out NaN for a non-finite input as for built-ins, whichever input it was.
    loss = loss * (1 + _non_finite_poison(columns, logit_bias, margins).to(loss.dtype))
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    **kwargs,
) -> torch.Tensor:
    """SupCon (Khosla et al., NeurIPS 2020), contrast_mode "all": every view is an anchor against
    every other view, L = −(τ/τ_base)·mean over positives of log softmax; no prototypes."""
    return contrastive_loss(
        features, labels, temperature=temperature, base_temperature=base_temperature, **kwargs
    )


def bcl_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    temperature: float = 0.1,
    **kwargs,
) -> torch.Tensor:
    """BCL (Zhu et al., CVPR 2022), as the authors' BalSCL.forward: class centers [C, d] are extra
    columns and positives (class-complement), each class enters the denominator as one averaged
    term with batch counts that include the centers (class-averaging), temperature without a
    base temperature, mean over all anchors."""
    if centers is None:
        raise ValueError("centers: BCL needs the class centers [C, d] (use supcon_loss without them)")
    return contrastive_loss(
        features, labels, centers, temperature=temperature, class_averaging=True, **kwargs
    )


def class_prior(class_counts, features: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """π_c = n_c / Σ n (float64) from training-set class counts (a sequence or a 1-D tensor)."""
    counts = check_class_counts(class_counts, features, num_classes)
    return counts / counts.sum()


def rcl_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor | None,
    class_counts: Sequence[int] | torch.Tensor,
    temperature: float = 0.1,
    feature_scale: float = 1.0,
    tail_margin: float = 0.0,
    class_averaging: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    """RCL (De Alvis, Denipitiyage, Seneviratne, arXiv 2312.01753), on BCL or standalone.

    From the paper's abstract, in the forms we inferred (the full text was not available):
    (1) Balanced-Softmax weighting (Ren et al., NeurIPS 2020) inside the contrastive softmax:
        logit_bias = log π, π the training-set class prior from class_counts;
    (2) intra-class compactness: features multiplied by feature_scale before the loss, so the
        logit scale is feature_scale² / temperature;
    (3) larger margins for tail classes: m_c = tail_margin·(n_min / n_c)^(1/4), subtracted from the
        logits of an anchor's own class (0 disables them).
    With centers (RCL on BCL) the class-averaging and class-complement of BCL apply; with
    centers=None (standalone) there is no class averaging unless class_averaging=True.
    """
    refuse_jit_trace()
    check_argument_order(features, labels, centers)
    prior = class_prior(class_counts, features, None if centers is None else centers.shape[0])
    tail_margin = check_logit_term("tail_margin", check_nonnegative_number("tail_margin", tail_margin))
    margins = None
    if tail_margin > 0:
        margins = tail_margin * (prior.min() / prior) ** 0.25
    if class_averaging is None:
        class_averaging = centers is not None
    return contrastive_loss(
        features,
        labels,
        centers,
        temperature=temperature,
        feature_scale=feature_scale,
        class_averaging=class_averaging,
        logit_bias=torch.log(prior),
        margins=margins,
        **kwargs,
    )


def logit_adjusted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int] | torch.Tensor,
    tau: float = 1.0,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021): CE(logits + τ·log π, labels), the
    classification half of BCL's objective α·LA-CE + β·BCL. weight (a [C] per-class rescaling)
    and reduction ("mean", "sum", "none") mean what they mean in F.cross_entropy."""
    logits = check_tensor("logits", logits, dims=(2,))
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating tensor, got {logits.dtype}")
    if logits.shape[0] == 0:
        raise ValueError(f"logits: expected a non-empty batch, got shape {tuple(logits.shape)}")
    labels = check_labels(labels, logits.shape[0], f"logits {tuple(logits.shape)} need one label per row")
    check_same_device("labels", labels, logits)
    tau = check_real_number("tau", tau)
    check_reduction(reduction)
    if weight is not None:
        weight = check_class_weight(weight, logits.shape[1], logits)
    prior = class_prior(class_counts, logits, logits.shape[1])
    check_label_range(labels, logits.shape[1])
    return F.cross_entropy(logits + (tau * torch.log(prior)).to(logits.dtype), labels,
                           weight=weight, reduction=reduction)
