"""nn.Module forms of the losses: the hyper-parameters live on the module, the tensors are passed
to forward. Keyword arguments not named here (reduction, backend, process_group, ...) are
forwarded to the functional form."""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from ._validation import integer_class_counts


class SupConLoss(nn.Module):
    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, **kwargs):
        super().__init__()
        self.temperature, self.base_temperature, self.kwargs = temperature, base_temperature, kwargs

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.supcon_loss(
            features, labels, self.temperature, self.base_temperature, **self.kwargs
        )


class BalancedContrastiveLoss(nn.Module):
    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__()
        self.temperature, self.kwargs = temperature, kwargs

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
    ) -> torch.Tensor:
        return functional.bcl_loss(features, labels, centers, self.temperature, **self.kwargs)


class _ClassCountsModule(nn.Module):
    """Keeps the training-set class counts as an int64 buffer: .to(device) moves it along, and
    .half() / .to(dtype), which cast only floating buffers, leave it exact (a count above 65,504
    would overflow in float16)."""

    def __init__(self, class_counts):
        super().__init__()
        self.register_buffer("class_counts", integer_class_counts(class_counts))


class RebalancedContrastiveLoss(_ClassCountsModule):
    def __init__(
        self,
        class_counts,
        temperature: float = 0.1,
        feature_scale: float = 1.0,
        tail_margin: float = 0.0,
        **kwargs,
    ):
        super().__init__(class_counts)
        self.temperature, self.feature_scale, self.tail_margin = temperature, feature_scale, tail_margin
        self.kwargs = kwargs

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor | None = None
    ) -> torch.Tensor:
        return functional.rcl_loss(
            features, labels, centers, self.class_counts, self.temperature, self.feature_scale,
            self.tail_margin, **self.kwargs,
        )


class LogitAdjustedLoss(_ClassCountsModule):
    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__(class_counts)
        self.tau = tau

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional.logit_adjusted_cross_entropy(logits, labels, self.class_counts, self.tau)
