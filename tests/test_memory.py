"""Memory above the inputs of the fused loss's PyTorch glue (at most 64 MB above the inputs
and gradients at N = 32,768, d = 128, bf16), measured by the live bytes of every tensor the glue
creates, with stand-in kernels whose outputs are the real kernels' (lse, and dz, dk in fp32)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rcl_kernels import fused
from rcl_kernels.kernels.contract import Kernels

MiB = 2**20


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held at once by the storages that ops create inside the mode (views
    of an argument create none)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {a.untyped_storage().data_ptr() for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


def stand_in_kernels():
    def forward(z, k, *args):
        return torch.zeros(z.shape[0])

    def backward(grad, z, k, *args):
        return torch.zeros(z.shape, dtype=torch.float32), torch.zeros(k.shape, dtype=torch.float32)

    return Kernels(forward, backward)


def test_tracker_sees_a_temporary():
    with LiveBytes() as mode:
        x = torch.ones(1 << 18)  # 1 MiB
        del x
        torch.ones(1 << 16)
    assert mode.peak == MiB


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_glue_memory_at_n32768_bf16(reduction):
    n, classes, d = 32768, 1000, 128
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).bfloat16().requires_grad_()
    k = torch.cat([z.detach(), torch.randn(classes, d, generator=gen).bfloat16()]).requires_grad_()
    labels = torch.randint(0, classes, (n,), generator=gen)
    col_labels = torch.cat([labels, torch.arange(classes)])
    tables = fused.class_tables(labels, col_labels, None, None, classes, True, torch.float32, z.device)
    with LiveBytes() as mode:
        loss = fused.loss(stand_in_kernels(), z, labels, k, col_labels, self_offset=0,
                          num_classes=classes, scale=10.0, tables=tables, allow_tf32=False,
                          reduction=reduction)
        forward_peak = mode.peak
        loss.sum().backward()
    kernel_outputs = (z.numel() + k.numel()) * 4  # dz, dk in fp32, as the real kernels return them
    gradients = (z.numel() + k.numel()) * 2
    glue = mode.peak - kernel_outputs - gradients
    assert forward_peak < 24 * MiB, f"forward {forward_peak / MiB:.1f} MiB"
    # Before the glue was chunked: 98.5 MiB in all, 49.8 MiB of glue.
    assert glue < 24 * MiB, f"glue {glue / MiB:.1f} MiB above the kernels' outputs and gradients"
