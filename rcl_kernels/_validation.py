"""Checks of user input. Every failure names the argument and what was expected."""

from __future__ import annotations

import math

import torch

from .backends import FLOATING

REDUCTIONS = ("mean", "sum", "none")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
            f"{name}: expected float32, float64, bfloat16 or float16, got {_dtype_name(value.dtype)}"
        )


def check_same_device(name: str, value: torch.Tensor, features: torch.Tensor) -> None:
    if value.device != features.device:
        raise ValueError(
            f"{name}: expected a tensor on {features.device} like features, got {value.device}"
        )


def check_positive_number(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def flatten_views(features, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, V, d] with labels [B], or [N, d] with labels [N] -> anchors [N, d], labels [N].

    Views are flattened view-major (all view-0 rows, then all view-1 rows), as BCL and SupCon do.
    """
    features = check_tensor("features", features, dims=(2, 3))
    check_floating("features", features)
    labels = check_tensor("labels", labels, dims=(1,))
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {_dtype_name(labels.dtype)}")
    check_same_device("labels", labels, features)
    if features.shape[0] == 0 or features.shape[-1] == 0 or features.numel() == 0:
        raise ValueError(f"features: expected a non-empty batch, got shape {tuple(features.shape)}")
    if labels.shape[0] != features.shape[0]:
        layout = "[B, V, d] needs labels [B]" if features.dim() == 3 else "[N, d] needs labels [N]"
        raise ValueError(
            f"labels: features {layout}; got {labels.shape[0]} labels for "
            f"{features.shape[0]} rows of features {tuple(features.shape)}"
        )
    labels = labels.long()
    if features.dim() == 3:
        batch, views, dim = features.shape
        return features.transpose(0, 1).reshape(views * batch, dim), labels.repeat(views)
    return features, labels


def check_class_table(name: str, table, features: torch.Tensor, num_classes: int | None):
    """A per-class vector (logit_bias, margins, class_counts): 1-D, floating or integer, no grad."""
    if table is None:
        return None
    table = check_tensor(name, table, dims=(1,))
    check_same_device(name, table, features)
    if table.requires_grad:
        raise ValueError(
            f"{name}: expected a constant tensor (requires_grad=False); the loss does not "
            "differentiate its per-class tables"
        )
    if num_classes is not None and table.shape[0] != num_classes:
        raise ValueError(f"{name}: expected {num_classes} entries (one per class), got {table.shape[0]}")
    return table


def check_prototypes(prototypes, features: torch.Tensor) -> torch.Tensor | None:
    if prototypes is None:
        return None
    prototypes = check_tensor("prototypes", prototypes, dims=(2,))
    check_same_device("prototypes", prototypes, features)
    if prototypes.dtype != features.dtype:
        raise TypeError(
            f"prototypes: expected dtype {_dtype_name(features.dtype)} like features, "
            f"got {_dtype_name(prototypes.dtype)}"
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
    """Eager only: reading the labels' range needs the values (a device sync on a GPU)."""
    if torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(labels)
    low, high = int(low), int(high)
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels: expected class indices in [0, {num_classes}), got values in [{low}, {high}]"
        )
