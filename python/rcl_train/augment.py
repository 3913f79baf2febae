"""Batch augmentation with kornia on the training device.

Each image gives three views: one for the classifier (pad-and-crop + flip) and two for the
contrastive loss (BCL's SimAugment: random resized crop, flip, colour jitter with p=0.8 and
grayscale with p=0.2). For 1-channel images (Fashion-MNIST) colour jitter keeps only brightness
and contrast and grayscale is skipped; the crop scale starts at 0.2 instead of 0.08 because a
28x28 crop of 8% of the image keeps almost nothing.

Randomness comes from torch's global generator, so the checkpoint's RNG state makes it reproducible.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

# Per-dataset normalization statistics (of the full training sets).
NORMALIZATION = {
    "fmnist-lt": ((0.2860,), (0.3530,)),
    "cifar10-lt": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100-lt": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


class ThreeViewAugment(nn.Module):
    """uint8 batch [B, C, H, W] -> normalized float views (see forward)."""

    def __init__(self, image_shape, mean, std, padding: int = 4):
        super().__init__()
        channels, h, w = image_shape
        size = (h, w)
        self.regular = nn.Sequential(
            K.RandomCrop(size, padding=padding, fill=0, padding_mode="constant"),
            K.RandomHorizontalFlip(),
        )
        if channels == 3:
            sim = [
                K.RandomResizedCrop(size, scale=(0.08, 1.0)),
                K.RandomHorizontalFlip(),
                K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                K.RandomGrayscale(p=0.2),
            ]
        else:
            sim = [
                K.RandomResizedCrop(size, scale=(0.2, 1.0)),
                K.RandomHorizontalFlip(),
                K.ColorJitter(brightness=0.4, contrast=0.4, p=0.8),
            ]
        self.sim = nn.Sequential(*sim)
        self.normalize = Normalize(mean, std)

    @torch.no_grad()
    def forward(self, x_uint8: torch.Tensor, contrastive: bool = True):
        """(classifier view, contrastive view 1, contrastive view 2), or only the classifier view
        in a 1-tuple when `contrastive` is False (LA-CE alone has no use for the other two)."""
        x = to_float(x_uint8)
        views = [self.regular(x)]
        if contrastive:
            views += [self.sim(x).clamp_(0, 1), self.sim(x).clamp_(0, 1)]
        return tuple(self.normalize(v) for v in views)

    @torch.no_grad()
    def eval_view(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.normalize(to_float(x_uint8))


def build_augment(dataset_name: str, image_shape) -> ThreeViewAugment:
    mean, std = NORMALIZATION[dataset_name]
    return ThreeViewAugment(image_shape, mean, std)
