"""Checks of user input. Every failure names the argument and what was expected.

Checks that need tensor values (label ranges, class counts) read them on the host only for CPU
tensors. On a GPU, and under torch.compile, they become device-side asserts: a loss call with a
known number of classes never waits for the GPU.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch

from ._dtypes import FLOATING, accumulation_dtype, dtype_name

REDUCTIONS = ("mean", "sum", "none")

# The largest logit scale and logit term accepted: see check_logit_scale.
LOGIT_LIMIT = torch.finfo(torch.float32).max / 2**24


def check_tensor(name: str, value, *, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in dims:
        shapes = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {shapes} tensor, got shape {tuple(value.shape)}")
    return value


def check_floating(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOATING:
        raise TypeError(
            f"{name}: expected float32, float64, bfloat16 or float16, got {dtype_name(value.dtype)}"
        )


def check_same_device(name: str, value: torch.Tensor, features: torch.Tensor,
                      like: str = "features") -> None:
    if value.device != features.device:
        raise ValueError(
            f"{name}: expected a tensor on {features.device} like {like}, got {value.device}"
        )


def _real(name: str, value, expected: str) -> float:
    """A Python or NumPy real number (not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    return float(value)


# Range checks compare instead of calling math.isfinite: under torch.compile with dynamic=True a
# Python float argument is a symbolic float, which a comparison turns into a guard and
# math.isfinite cannot take. NaN fails every comparison, so `low < x < inf` also refuses NaN.

def check_positive_number(name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    number = _real(name, value, "a positive number")
    if not 0 < number < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return number


def check_nonnegative_number(name: str, value) -> float:
    number = _real(name, value, "a number >= 0")
    if not 0 <= number < math.inf:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return number


def check_real_number(name: str, value) -> float:
    number = _real(name, value, "a number")
    if not -math.inf < number < math.inf:
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return number


def check_logit_scale(temperature: float, feature_scale: float) -> float:
    """s = feature_scale² / temperature, refused when float32 logits could not carry it.

    The kernels accumulate in float32 whatever the input dtype. With unit-norm features a logit
    is at most s in size, and the positive term s·<z_i, Σ_{j∈Pos(i)} k_j> is at most s·M for M
    columns; LOGIT_LIMIT keeps that finite for M up to 2**24 columns. A larger s gives ±Inf on
    one backend and NaN on another, so it is refused here, the same for every backend.
    feature_scale * feature_scale (not **2) for the check: a Python float power raises
    OverflowError instead of returning inf."""
    if not feature_scale * feature_scale / temperature <= LOGIT_LIMIT:
        raise ValueError(
            f"temperature, feature_scale: the logit scale feature_scale**2 / temperature = "
            f"{feature_scale}**2 / {temperature} exceeds {LOGIT_LIMIT:.3g}, the largest that float32 "
            "logits carry (float32 max / 2**24); raise temperature or lower feature_scale"
        )
    return feature_scale**2 / temperature


def check_logit_term(name: str, value: float) -> float:
    """A per-class logit term given as a Python float (a margin): at most LOGIT_LIMIT in size,
    for the reason check_logit_scale gives."""
    if not abs(value) <= LOGIT_LIMIT:
        raise ValueError(
            f"{name}: expected at most {LOGIT_LIMIT:.3g} in size, the largest logit term that "
            f"float32 logits carry (float32 max / 2**24), got {value}"
        )
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def check_labels(labels, rows: int, layout: str) -> torch.Tensor:
    labels = check_tensor("labels", labels, dims=(1,))
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {dtype_name(labels.dtype)}")
    if labels.shape[0] != rows:
        raise ValueError(f"labels: {layout}; got {labels.shape[0]} labels for {rows} rows")
    return labels.long()


def flatten_views(features, labels, *, allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, V, d] with labels [B], or [N, d] with labels [N] -> anchors [N, d], labels [N].

    Views are flattened view-major (all view-0 rows, then all view-1 rows), as BCL and SupCon do.
    allow_empty accepts B = 0: a rank of a process group may have no anchors (the gather checks
    that some rank has, on every rank alike). V = 0 and d = 0 are refused either way.
    """
    features = check_tensor("features", features, dims=(2, 3))
    check_floating("features", features)
    if (features.shape[0] == 0 and not allow_empty) or 0 in features.shape[1:]:
        raise ValueError(f"features: expected a non-empty batch, got shape {tuple(features.shape)}")
    layout = "features [B, V, d] needs labels [B]" if features.dim() == 3 else "features [N, d] needs labels [N]"
    labels = check_labels(labels, features.shape[0], f"{layout} (features {tuple(features.shape)})")
    check_same_device("labels", labels, features)
    if features.dim() == 3:
        batch, views, dim = features.shape
        return features.transpose(0, 1).reshape(views * batch, dim), labels.repeat(views)
    return features, labels


def check_class_table(name: str, table, features: torch.Tensor, num_classes: int | None):
    """A per-class vector (logit_bias, margins): 1-D, real, constant, on the features' device."""
    if table is None:
        return None
    table = check_tensor(name, table, dims=(1,))
    if table.dtype == torch.bool or table.dtype.is_complex:
        raise TypeError(f"{name}: expected a real tensor, got {dtype_name(table.dtype)}")
    check_same_device(name, table, features)
    if table.requires_grad:
        raise ValueError(
            f"{name}: expected a constant tensor (requires_grad=False); the loss does not "
            "differentiate its per-class tables"
        )
    if num_classes is not None and table.shape[0] != num_classes:
        raise ValueError(f"{name}: expected {num_classes} entries (one per class), got {table.shape[0]}")
    return table


def check_counts_are_not_booleans(counts) -> None:
    """torch.as_tensor reads True and False as counts of 1 and 0, also inside a list of numbers,
    where the tensor's dtype no longer shows them: refuse booleans before any conversion."""
    def is_boolean(value) -> bool:  # a Python, NumPy or torch bool, scalar or array
        dtype = getattr(value, "dtype", None)
        return isinstance(value, bool) or dtype == torch.bool or str(dtype) == "bool"

    if is_boolean(counts):
        raise TypeError("class_counts: expected integer or real counts, got booleans")
    if isinstance(counts, (list, tuple)):
        for index, item in enumerate(counts):
            if is_boolean(item):
                raise TypeError(f"class_counts: expected integer or real counts, got {item!r} at index {index}")


def integer_class_counts(counts) -> torch.Tensor:
    """A module's class counts: 1-D integers > 0, as an int64 tensor."""
    check_counts_are_not_booleans(counts)
    table = torch.as_tensor(counts)
    if table.dtype.is_complex:
        raise TypeError(f"class_counts: expected integer counts, got {table.dtype}")
    as_int = table.to(torch.int64)
    if table.dim() != 1 or table.numel() == 0 or not torch.equal(as_int.to(table.dtype), table) \
            or bool((as_int <= 0).any()):
        raise ValueError(f"class_counts: expected a 1-D sequence of integer counts > 0, got {counts!r}")
    return as_int


def check_class_weight(weight, num_classes: int, logits: torch.Tensor | None = None) -> torch.Tensor:
    """A per-class rescaling weight as F.cross_entropy takes it: a 1-D floating tensor with one
    entry per class (on the logits' device when logits are given; dtypes as F.cross_entropy
    takes them, so that autocast works as for it)."""
    weight = check_tensor("weight", weight, dims=(1,))
    check_floating("weight", weight)
    if weight.shape[0] != num_classes:
        raise ValueError(f"weight: expected {num_classes} entries (one per class), got {weight.shape[0]}")
    if logits is not None:
        check_same_device("weight", weight, logits, "logits")
    return weight


def check_class_counts(counts, features: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Training-set class counts (a sequence or a 1-D tensor): finite and > 0, as float64 on the
    features' device. Sequences and CPU tensors are checked on the host; a GPU tensor by a
    device-side assert (no sync)."""
    check_counts_are_not_booleans(counts)
    if not isinstance(counts, torch.Tensor):
        try:
            counts = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"class_counts: expected a sequence of numbers or a tensor ({error})") from None
        counts = counts.to(features.device)
    counts = check_class_table("class_counts", counts, features, num_classes)
    counts = counts.to(torch.float64)
    if counts.numel() == 0:
        raise ValueError("class_counts: expected a count for every class, got none")
    valid = (counts > 0) & torch.isfinite(counts)
    message = "class_counts: expected a finite count > 0 for every class"
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(valid.all()):
            raise ValueError(f"{message}, got {counts[~valid][:5].tolist()}")
    else:
        torch._assert_async(valid.all(), message)
    return counts


def check_prototypes(prototypes, features: torch.Tensor) -> torch.Tensor | None:
    if prototypes is None:
        return None
    prototypes = check_tensor("prototypes", prototypes, dims=(2,))
    check_same_device("prototypes", prototypes, features)
    if prototypes.dtype != features.dtype:
        raise TypeError(
            f"prototypes: expected dtype {dtype_name(features.dtype)} like features, "
            f"got {dtype_name(prototypes.dtype)}"
        )
    if prototypes.shape[1] != features.shape[-1]:
        raise ValueError(
            f"prototypes: expected [C, {features.shape[-1]}] (feature dim of features), "
            f"got {tuple(prototypes.shape)}"
        )
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes: expected at least one class, got shape (0, d)")
    return prototypes


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes): a ValueError for CPU tensors in eager mode; a device-side
    assert on a GPU and under torch.compile (reading the values would wait for the device)."""
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels: expected class indices in [0, {num_classes}), got values in [{low}, {high}]"
            )
        return
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    torch._assert_async(in_range, f"labels: expected class indices in [0, {num_classes})")


def refuse_jit_trace() -> None:
    """torch.jit.trace would freeze what the argument checks and the class tables read from the
    values (label ranges, the classes present, the backend's choice) into the trace."""
    if not torch.compiler.is_compiling() and torch.jit.is_tracing():
        raise RuntimeError(
            "rcl_kernels: torch.jit.trace cannot record these losses (their checks and class tables "
            "depend on tensor values that a trace would freeze); use torch.compile, or torch.export "
            "for a graph to save"
        )


def check_argument_order(features, labels, prototypes) -> None:
    """BCL's BalSCL(cls_num_list, temperature) is called as (centers, features, targets); passed
    to our (features, labels, centers) that puts floating [B, V, d] features in labels and
    integer targets [B] in centers."""
    if isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.dim() >= 2 \
            and isinstance(prototypes, torch.Tensor) and prototypes.dim() == 1 \
            and not prototypes.is_floating_point() and not prototypes.is_complex():
        raise ValueError(
            f"labels: got floating features of shape {tuple(labels.shape)} and centers: got integer "
            f"labels of shape {tuple(prototypes.shape)}: this looks like BCL's BalSCL order "
            "(centers, features, targets). rcl_kernels takes (features, labels, centers): call "
            "bcl_loss(features, targets, centers) or BalancedContrastiveLoss(temperature)"
            "(features, targets, centers)"
        )


# Row norms outside this range draw the one-time warning of warn_once_if_not_unit_norm.
UNIT_NORM_RANGE = (0.5, 2.0)
_unit_norm_warning = {"given": False}


def warn_once_if_not_unit_norm(anchors: torch.Tensor) -> None:
    """Warn once per process when a row's L2 norm is outside UNIT_NORM_RANGE: the losses expect
    normalized features (SupCon, BCL and pytorch-metric-learning normalize them) and a scale of 5
    multiplies every logit by 25. Checked only where reading the norms costs no device sync and
    no graph break: CPU tensors in eager mode, outside torch.func transforms."""
    if _unit_norm_warning["given"] or anchors.device.type != "cpu" or anchors.numel() == 0 \
            or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(anchors):
        return
    with torch.no_grad():
        norms = torch.linalg.vector_norm(anchors.detach(), dim=-1, dtype=accumulation_dtype(anchors.dtype))
        low, high = (float(v) for v in torch.aminmax(norms))
    if low < UNIT_NORM_RANGE[0] or high > UNIT_NORM_RANGE[1]:
        _unit_norm_warning["given"] = True
        warnings.warn(
            f"features: row norms range over [{low:.3g}, {high:.3g}], far from 1; the losses expect "
            "L2-normalized features: pass normalize=True or normalize them before the loss "
            "(warned once)",
            UserWarning,
            stacklevel=_stacklevel_outside_package(),
        )


def _stacklevel_outside_package() -> int:
    """The warnings.warn stacklevel of the first caller outside rcl_kernels (a preset, a module
    and contrastive_loss itself sit at different depths)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    return level
