"""SGD with momentum and weight decay; linear warm-up then cosine decay, set per step."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


class WarmupCosine:
    """lr(step) for step = 0..total-1: linear warm-up to base_lr, then cosine decay to 0.

    The warm-up is capped at a fifth of the run so that very short runs still reach the peak.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int):
        self.base_lr = base_lr
        self.total = max(1, int(total_steps))
        self.warmup = min(int(warmup_steps), self.total // 5)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
