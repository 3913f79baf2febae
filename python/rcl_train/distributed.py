"""Data-parallel training under torchrun: DistributedDataParallel + the distributed contrastive loss.

    torchrun --nproc_per_node=K -m rcl_train ...          (one node, K GPUs or K CPU processes)

Everything is arranged so that K processes compute exactly what one process computes on the same
global batch (`--batch-size` stays the GLOBAL batch size; it must be divisible by K):

* every rank draws the same epoch order and augments the same global batch with the same RNG
  stream (so the RNG state in rank 0's checkpoint is every rank's, and resuming stays exact),
  then keeps its DistributedSampler share (positions rank, rank + K, ...) of the augmented views;
* BatchNorm statistics are synchronized over the ranks (torch.nn.SyncBatchNorm on CUDA; on the
  CPU, where PyTorch's SyncBatchNorm does not run, `GlobalBatchNorm` below), so they are those
  of the global batch;
* the contrastive loss gets `process_group=`: local anchors against the anchors of every rank
  (rcl_kernels/distributed.py). Its feature gradients are those of the sum of the ranks' losses,
  prototype gradients those of the local loss, so DDP's averaging gives exactly the gradient of
  the mean over ranks of the local losses = the single-process loss (equal local sizes; every
  anchor has a positive with two views). LA-CE is a per-rank mean, averaged likewise;
* logged losses are averaged over the ranks; rank 0 alone writes the output directory (the other
  ranks write into a temporary directory that is removed at the end) and prints.

Backends: NCCL when the device is CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the backward sums the gradients too: the gradient reaching each rank's
    input is that of the sum of all ranks' losses (the convention DDP's averaging expects)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the union of every rank's batch (two-pass
    mean and biased variance, running statistics updated like nn.BatchNorm with the unbiased
    global variance); differentiable through the statistics. For gloo/CPU, where
    torch.nn.SyncBatchNorm refuses to run. Same parameters and buffers as the module it replaces.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_count = x.numel() // channels
        first = torch.cat([x.sum(dims), x.new_full((1,), float(local_count))])
        first = _AllReduceSum.apply(first, self.process_group)
        count = first[-1].detach()
        mean = first[:channels] / count
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), self.process_group) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out


def convert_batchnorm(module: nn.Module, group, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` synchronized over `group` (parameters and buffers kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group=group)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, group, device))
    return module


class DistributedRun:
    """The torchrun process group of one training run and what the trainer needs from it."""

    def __init__(self, device_name: str):
        self.world = world_size()
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = device_name.startswith("cuda") or (
            device_name == "auto" and torch.cuda.is_available())
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.cuda else "gloo", init_method="env://")
        self.group = dist.group.WORLD
        self._scratch = None
        self._positions = None

    # ---------------------------------------------------------------- setup
    def rank_config(self, cfg, log):
        """(cfg, log) for this rank: each rank on cuda:LOCAL_RANK (or the CPU); rank 0 writes and
        prints as usual, the others print nothing (stdout to /dev/null for the rest of the
        process, so the final summary too; stderr kept) and write into a scratch directory
        removed by close()."""
        if self.cuda:
            cfg = dataclasses.replace(cfg, device=f"cuda:{self.local_rank}")
        if self.rank == 0:
            return cfg, log
        self._scratch = tempfile.mkdtemp(prefix=f"rcl-train-rank{self.rank}-")
        sys.stdout = open(os.devnull, "w")
        return dataclasses.replace(cfg, out=self._scratch, progress=False, plots=False,
                                   tensorboard=None), _silent

    def wrap(self, model: nn.Module, objective, device: torch.device, batch_size: int) -> nn.Module:
        """Synchronize BatchNorm, hand the process group to the loss, wrap the model in DDP."""
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} (the global batch) must be divisible by "
                             f"the number of processes, {self.world}")
        self._positions = torch.tensor(list(torch.utils.data.DistributedSampler(
            range(batch_size), num_replicas=self.world, rank=self.rank, shuffle=False)),
            device=device)
        # BCLModel.head_fc maps the classifier weights, which are the same on every rank, to the
        # class centers: its BatchNorm already sees the whole "batch" and stays local (synchronized,
        # each class would count K times in the unbiased running variance).
        for name, child in model.named_children():
            if name != "head_fc":
                model.add_module(name, convert_batchnorm(child, self.group, device))
        objective.process_group = self.group
        # supcon leaves the center head unused, "none" the projection head too
        unused = objective.kind in ("none", "supcon")
        device_ids = [self.local_rank] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, process_group=self.group, find_unused_parameters=unused)

    # ---------------------------------------------------------------- per step
    def local_share(self, *tensors: torch.Tensor):
        """This rank's DistributedSampler share of every tensor of a global batch."""
        return [t[self._positions] for t in tensors]

    def mean_over_ranks(self, parts: dict) -> dict:
        """The logged losses averaged over the ranks (= the global-batch values)."""
        keys = list(parts)
        values = torch.stack([parts[k].detach().double() for k in keys])
        dist.all_reduce(values, group=self.group)
        values /= self.world
        return {k: values[i] for i, k in enumerate(keys)}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _silent(*args, **kwargs):
    pass
