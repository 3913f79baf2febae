"""Backbones and the BCL model: encoder -> (contrastive features, cosine logits, class centers).

- ResNet-32 (He et al. 2016, CIFAR variant: 3 stages of 5 basic blocks, widths 16/32/64, parameter-free
  "option A" shortcuts), as in LDAM/BCL for 32x32 images.
- ResNet-8 (same family, 1 block per stage) as the small ResNet for 28x28 Fashion-MNIST.
- BCLModel (Zhu et al. CVPR 2022): cosine classifier (normalized features and weights, scale 30),
  MLP projection head to normalized contrastive features, and class centers
  normalize(head_fc(W)) made by a second MLP from the classifier weights W [C, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCH_DEPTHS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # option A: subsample and zero-pad the channels

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any input size (global average pooling at the end)."""

    def __init__(self, blocks_per_stage: int, in_channels: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and b == 0) else 1))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build_backbone(arch: str, in_channels: int) -> CifarResNet:
    if arch not in ARCH_DEPTHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCH_DEPTHS)}")
    return CifarResNet(ARCH_DEPTHS[arch], in_channels=in_channels)


class CosineClassifier(nn.Module):
    """logits = scale * <normalize(x), normalize(w_c)>; weight is [C, d] like nn.Linear."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class BCLModel(nn.Module):
    """Encoder + cosine classifier + projection head + center head (BCL's BCLModel)."""

    def __init__(self, backbone: nn.Module, num_classes: int, feat_dim: int = 128,
                 hidden_dim: int = 512, cls_scale: float = 30.0):
        super().__init__()
        self.encoder = backbone
        d = backbone.out_dim
        self.fc = CosineClassifier(d, num_classes, scale=cls_scale)
        self.head = mlp(d, hidden_dim, feat_dim)
        self.head_fc = mlp(d, hidden_dim, feat_dim)

    def forward(self, x, with_contrastive: bool = True):
        feat = self.encoder(x)
        logits = self.fc(feat)
        if not with_contrastive:
            return logits
        # Under autocast the heads give bf16 and CUDA autocast computes the norm in fp32: keep
        # the heads' dtype, so the contrastive loss gets (and runs in) bf16 features.
        h, c = self.head(feat), self.head_fc(self.fc.weight)
        z = F.normalize(h, dim=1).to(h.dtype)
        centers = F.normalize(c, dim=1).to(c.dtype)
        return z, logits, centers


def default_arch(dataset: str) -> str:
    return "resnet8" if dataset == "fmnist-lt" else "resnet32"


def build_model(arch: str, in_channels: int, num_classes: int, feat_dim: int = 128,
                hidden_dim: int = 512) -> BCLModel:
    return BCLModel(build_backbone(arch, in_channels), num_classes, feat_dim=feat_dim,
                    hidden_dim=hidden_dim)
