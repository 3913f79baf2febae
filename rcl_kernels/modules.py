"""nn.Module forms of the losses: the hyper-parameters live on the module, the tensors are passed
to forward. Every option is a named keyword, so a misspelt one fails at construction, and the
hyper-parameters are checked there too; repr() shows them."""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from ._checks import (
    check_class_weight,
    check_logit_scale,
    check_logit_term,
    check_nonnegative_number,
    check_positive_int,
    check_positive_number,
    check_real_number,
    check_reduction,
    integer_class_counts,
)


class _ContrastiveModule(nn.Module):
    """The options every contrastive module forwards to the functional form."""

    def __init__(self, *, normalize, reduction, backend, algorithm, process_group):
        super().__init__()
        check_reduction(reduction)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
        self.normalize, self.reduction, self.backend, self.algorithm = normalize, reduction, backend, algorithm
        self.process_group = process_group

    def _options(self) -> dict:
        return dict(normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                    algorithm=self.algorithm, process_group=self.process_group)

    def _hyper_parameters(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        shown = {**self._hyper_parameters(), **self._options()}
        if shown.pop("process_group") is not None:
            shown["process_group"] = "set"
        return ", ".join(f"{name}={value!r}" for name, value in shown.items())


class SupConLoss(_ContrastiveModule):
    """SupCon (see functional.supcon_loss); forward(features, labels)."""

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, *,
                 normalize: bool = False, reduction: str = "mean", backend: str = "auto",
                 algorithm: str = "auto", num_classes: int | None = None, process_group=None):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         algorithm=algorithm, process_group=process_group)
        check_positive_number("temperature", temperature)
        check_positive_number("base_temperature", base_temperature)
        check_logit_scale(temperature, 1.0)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        self.temperature, self.base_temperature, self.num_classes = temperature, base_temperature, num_classes

    def _hyper_parameters(self) -> dict:
        return dict(temperature=self.temperature, base_temperature=self.base_temperature,
                    num_classes=self.num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.supcon_loss(features, labels, self.temperature, self.base_temperature,
                                      num_classes=self.num_classes, **self._options())


class BalancedContrastiveLoss(_ContrastiveModule):
    """BCL (see functional.bcl_loss); forward(features, labels, centers)."""

    def __init__(self, temperature: float = 0.1, *, normalize: bool = False,
                 reduction: str = "mean", backend: str = "auto", algorithm: str = "auto",
                 process_group=None):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         algorithm=algorithm, process_group=process_group)
        check_positive_number("temperature", temperature)
        check_logit_scale(temperature, 1.0)
        self.temperature = temperature

    def _hyper_parameters(self) -> dict:
        return dict(temperature=self.temperature)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
    ) -> torch.Tensor:
        return functional.bcl_loss(features, labels, centers, self.temperature, **self._options())


class _ClassCountsMixin:
    """Keeps the training-set class counts as an int64 buffer: .to(device) moves it along, and
    .half() / .to(dtype), which cast only floating buffers, leave it exact (a count above 65,504
    would overflow in float16). load_state_dict runs the same count checks as the constructor."""

    def _register_class_counts(self, class_counts) -> None:
        self.register_buffer("class_counts", integer_class_counts(class_counts))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "class_counts"
        if key in state_dict:
            try:
                state_dict[key] = integer_class_counts(state_dict[key])
            except (TypeError, ValueError) as error:
                raise type(error)(f"load_state_dict: {key}: {error}") from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RebalancedContrastiveLoss(_ClassCountsMixin, _ContrastiveModule):
    """RCL (see functional.rcl_loss); forward(features, labels, centers=None)."""

    def __init__(self, class_counts, temperature: float = 0.1, feature_scale: float = 1.0,
                 tail_margin: float = 0.0, *, class_averaging: bool | None = None,
                 normalize: bool = False, reduction: str = "mean", backend: str = "auto",
                 algorithm: str = "auto", process_group=None):
        super().__init__(normalize=normalize, reduction=reduction, backend=backend,
                         algorithm=algorithm, process_group=process_group)
        self._register_class_counts(class_counts)
        check_logit_scale(check_positive_number("temperature", temperature),
                          check_positive_number("feature_scale", feature_scale))
        check_logit_term("tail_margin", check_nonnegative_number("tail_margin", tail_margin))
        if class_averaging is not None and not isinstance(class_averaging, bool):
            raise TypeError(f"class_averaging: expected a bool or None, got {type(class_averaging).__name__}")
        self.temperature, self.feature_scale, self.tail_margin = temperature, feature_scale, tail_margin
        self.class_averaging = class_averaging

    def _hyper_parameters(self) -> dict:
        return dict(num_classes=self.class_counts.shape[0], temperature=self.temperature,
                    feature_scale=self.feature_scale, tail_margin=self.tail_margin,
                    class_averaging=self.class_averaging)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor | None = None
    ) -> torch.Tensor:
        return functional.rcl_loss(
            features, labels, centers, self.class_counts, self.temperature, self.feature_scale,
            self.tail_margin, class_averaging=self.class_averaging, **self._options(),
        )


class LogitAdjustedLoss(_ClassCountsMixin, nn.Module):
    """Logit-adjusted cross-entropy (see functional.logit_adjusted_cross_entropy);
    forward(logits, labels). weight and reduction as in nn.CrossEntropyLoss."""

    def __init__(self, class_counts, tau: float = 1.0, *, weight: torch.Tensor | None = None,
                 reduction: str = "mean"):
        super().__init__()
        self._register_class_counts(class_counts)
        check_real_number("tau", tau)
        check_reduction(reduction)
        if weight is not None:
            weight = check_class_weight(weight, self.class_counts.shape[0])
        self.register_buffer("weight", weight)
        self.tau, self.reduction = tau, reduction

    def extra_repr(self) -> str:
        return (f"num_classes={self.class_counts.shape[0]}, tau={self.tau!r}, "
                f"weight={'set' if self.weight is not None else None}, reduction={self.reduction!r}")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.logit_adjusted_cross_entropy(logits, labels, self.class_counts, self.tau,
                                                       weight=self.weight, reduction=self.reduction)
