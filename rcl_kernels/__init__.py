"""Fused kernels for the class-balanced supervised contrastive losses of long-tailed recognition
(SupCon, BCL, RCL): one general op (DESIGN §1) behind interchangeable backends."""

from .backends import available_backends
from .functional import (
    bcl_loss,
    contrastive_loss,
    logit_adjusted_cross_entropy,
    rcl_loss,
    supcon_loss,
)
from .modules import (
    BalancedContrastiveLoss,
    LogitAdjustedLoss,
    RebalancedContrastiveLoss,
    SupConLoss,
)

__all__ = [
    "available_backends",
    "contrastive_loss",
    "supcon_loss",
    "bcl_loss",
    "rcl_loss",
    "logit_adjusted_cross_entropy",
    "SupConLoss",
    "BalancedContrastiveLoss",
    "RebalancedContrastiveLoss",
    "LogitAdjustedLoss",
]
