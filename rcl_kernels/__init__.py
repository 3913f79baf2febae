"""Fused kernels for the class-balanced supervised contrastive losses of long-tailed recognition
(SupCon, BCL, RCL): one general op behind interchangeable backends."""

import torch as _torch

from ._version import __version__, build_info as _build_info, check_torch as _check_torch

# Before the compiled kernels load: under another torch they fail with an undefined symbol.
_check_torch(_torch.__version__, _build_info())

from .dispatch import available_backends  # noqa: E402
from .functional import (  # noqa: E402
    bcl_loss,
    contrastive_loss,
    logit_adjusted_cross_entropy,
    rcl_loss,
    supcon_loss,
)
from .modules import (  # noqa: E402
    BalancedContrastiveLoss,
    LogitAdjustedLoss,
    RebalancedContrastiveLoss,
    SupConLoss,
)

__all__ = [
    "__version__",
    "__version__",
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
