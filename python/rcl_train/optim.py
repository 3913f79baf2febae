"""SGD with momentum and weight decay; linear warm-up then cosine decay, as a LambdaLR stepped
once per optimizer step (its state is in the checkpoint, so a resumed run continues the schedule)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def warmup_steps_used(total_steps: int, warmup_steps: int) -> int:
    """The warm-up is capped at a fifth of the run so that very short runs still reach the peak."""
    return min(int(warmup_steps), max(1, int(total_steps)) // 5)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """The lr factor of step = 0..total-1: linear warm-up to 1, then cosine decay to 0."""
    total = max(1, int(total_steps))
    warmup = warmup_steps_used(total, warmup_steps)
    span = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
