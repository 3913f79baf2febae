"""Contrast local anchors with the anchors of every rank (DESIGN §1, "offset").

With `process_group=` every loss of rcl_kernels keeps its rows local (the anchors of this rank)
and takes as columns the anchors of *all* ranks, gathered here in rank order, followed by the
prototypes, which are replicated on every rank and are not gathered. Class counts and class sums
are computed over the columns, so they are global without any further communication.

Convention (exact relations; "single process" means one call on the concatenated batch)
-----------------------------------------------------------------------------------------
Let rank r hold N_r anchors, P_r of which have a positive, P = Σ_r P_r, W ranks, and let L_r be the
loss rank r returns. The single-process equivalent is the concatenation of every rank's anchors
in rank order: for [N_r, d] features `torch.cat` of them (labels likewise); for [B_r, V, d]
features either the concatenation of each rank's view-major flattening [V·B_r, d] (exactly the
global column order) or simply `torch.cat` of the [B_r, V, d] tensors along dim 0 -- a reduced
loss does not depend on the order of the anchors, only reduction="none" does.

* Loss. Each rank's loss is over its own anchors only: with reduction="mean", L_r is the mean over
  this rank's anchors that have a positive (positives and counts taken over all ranks' columns).
  So Σ_r P_r·L_r / P equals the single-process mean L; with equal P_r (equal local sizes and
  every anchor has a positive, which always holds with V ≥ 2 views or with prototypes) the mean
  over ranks of L_r equals L. With reduction="sum", Σ_r L_r equals the single-process sum;
  reduction="none" returns this rank's rows of the single-process result.
* Feature gradients. The backward of the gather sums the column gradients of every rank and
  hands each rank its own slice, so the gradient reaching rank r's features is
  ∂(Σ_q L_q)/∂Z_r: that of the SUM of all ranks' losses, not of L_r alone.
* Prototype gradients. Prototypes are replicated (not gathered): rank r's prototype gradient is
  ∂L_r/∂prototypes, of its own loss only; their sum over ranks is ∂(Σ_q L_q)/∂prototypes.
* Under DistributedDataParallel (which averages parameter gradients over the W ranks) a parameter
  θ gets, on rank r, (∂(Σ_q L_q)/∂Z_r)·∂Z_r/∂θ + (∂L_r/∂prototypes)·∂prototypes/∂θ; summed over
  r, every (anchor, loss) pair is counted exactly once, so the averaged gradient is exactly
  ∂/∂θ of (1/W)·Σ_q L_q -- the gradient of the single-process loss L when the P_r are equal.
  No rescaling by W and no special handling of the prototypes is needed. Log the mean over ranks
  of L_r (an all_reduce of the detached loss divided by W) to report L.
  With unequal P_r, DDP weighs each rank's mean equally, as it does for any per-rank mean such
  as cross-entropy; for the exact single-process gradient use reduction="sum" and multiply by
  W / P (P = Σ_r P_r, e.g. an all_reduce of the local counts; P = Σ_r N_r when every anchor has
  a positive).

Requirements: every rank of the group calls the loss at the same point and runs its backward
(forward and backward contain collectives); local sizes may differ, the feature dimension and
dtype may not; the anchors must be on a device the group's backend handles (gloo: CPU, NCCL:
CUDA). The only host synchronization is the gather of the local sizes (a tiny collective, which
reads them on the host: this path is meant for eager mode, not for torch.compile's fullgraph).
"""

from __future__ import annotations

import torch

# Gloo gathers through the list form of all_gather (supported by every PyTorch version) and
# backpropagates with an all_reduce; other backends (NCCL) use the single-tensor collectives
# (all_gather_into_tensor / reduce_scatter_tensor). Set to True to use the single-tensor forms
# on gloo as well (the tests do, to cover that path on the CPU).
FLAT_COLLECTIVES_ON_GLOO = False


def _dist():
    import torch.distributed as dist

    return dist


def _use_flat_collectives(group) -> bool:
    dist = _dist()
    gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
    scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
    if gather is None or scatter is None:
        return False
    return FLAT_COLLECTIVES_ON_GLOO or dist.get_backend(group) != "gloo"


def _gather_flat(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    dist = _dist()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    dist = _dist()
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, tensor, group=group)


def _all_gather_rows(rows: torch.Tensor, sizes: list[int], group, flat: bool) -> torch.Tensor:
    """Concatenate the `rows` of every rank (rank r holds sizes[r] rows) in rank order."""
    world, longest = len(sizes), max(sizes)
    rows = rows.contiguous()
    if rows.shape[0] < longest:  # unequal sizes: pad to the longest, gather, unpad
        padding = rows.new_zeros((longest - rows.shape[0],) + tuple(rows.shape[1:]))
        rows = torch.cat([rows, padding])
    if flat:
        gathered = rows.new_empty((world * longest,) + tuple(rows.shape[1:]))
        _gather_flat(gathered, rows, group)
        parts = list(gathered.split(longest))
    else:
        parts = [torch.empty_like(rows) for _ in range(world)]
        _dist().all_gather(parts, rows, group=group)
        if all(size == longest for size in sizes):
            return torch.cat(parts)
    if all(size == longest for size in sizes):
        return gathered
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _sum_scatter_rows(
    grad: torch.Tensor, sizes: list[int], rank: int, group, flat: bool
) -> torch.Tensor:
    """The backward of `_all_gather_rows`: sum `grad` [Σ sizes, ...] over the ranks and return the
    rows of this rank."""
    world, longest = len(sizes), max(sizes)
    tail = tuple(grad.shape[1:])
    grad = grad.contiguous()
    if all(size == longest for size in sizes):
        padded = grad if flat else grad.clone()  # all_reduce works in place: never on autograd's
    else:
        padded = grad.new_zeros((world, longest) + tail)
        for r, part in enumerate(grad.split(sizes)):
            padded[r, : sizes[r]] = part
        padded = padded.view((world * longest,) + tail)
    if flat:
        mine = grad.new_empty((longest,) + tail)
        _reduce_scatter_flat(mine, padded, group)
    else:
        _dist().all_reduce(padded, group=group)
        mine = padded[rank * longest : (rank + 1) * longest]
    return mine[: sizes[rank]]


class _GatherAnchors(torch.autograd.Function):
    """All-gather of rows whose backward sums the gradients of every rank and keeps this rank's
    slice: the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, rows, sizes, rank, group, flat):
        ctx.sizes, ctx.rank, ctx.group, ctx.flat = sizes, rank, group, flat
        return _all_gather_rows(rows, sizes, group, flat)

    @staticmethod
    def backward(ctx, grad):
        return _sum_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group, ctx.flat), None, None, None, None


def _check_group(process_group):
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group: torch.distributed is not initialized (call "
            "torch.distributed.init_process_group first, or pass process_group=None)"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this process is not a member of the given group")


def gather_anchors(
    anchors: torch.Tensor, labels: torch.Tensor, process_group
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(all anchors [N_all, d], their labels [N_all], offset of this rank's first anchor among them).

    On one process (process_group=None) the columns are the local anchors themselves and the
    offset is 0. With a process group the anchors of every rank are gathered in rank order (rank
    0's N_0 rows, then rank 1's, ...), local sizes may differ; the gather is differentiable and
    its backward returns to each rank the sum over all ranks of the gradients of its rows (see
    the module docstring for the resulting loss/gradient convention). Labels are gathered
    without gradient.
    """
    if process_group is None:
        return anchors, labels, 0
    _check_group(process_group)
    dist = _dist()
    world = dist.get_world_size(process_group)
    if world == 1:
        return anchors, labels, 0
    rank = dist.get_rank(process_group)
    flat = _use_flat_collectives(process_group)

    # The local sizes (and the feature dimension, checked so that a mismatch raises on every rank
    # alike instead of failing inside the gather).
    shape = torch.tensor([anchors.shape[0], anchors.shape[1]], dtype=torch.int64, device=anchors.device)
    shapes = _all_gather_rows(shape[None], [1] * world, process_group, flat).tolist()
    sizes = [n for n, _ in shapes]
    dims = sorted({d for _, d in shapes})
    if len(dims) > 1:
        raise ValueError(
            f"features: every rank must have the same feature dimension, got {[d for _, d in shapes]}"
        )

    all_anchors = _GatherAnchors.apply(anchors, sizes, rank, process_group, flat)
    with torch.no_grad():
        all_labels = _all_gather_rows(labels, sizes, process_group, flat)
    return all_anchors, all_labels, sum(sizes[:rank])
