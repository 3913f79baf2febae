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
(forward and backward contain collectives). Local sizes may differ and may be 0 -- a rank without
anchors contributes no columns, its loss is 0 with reduction "mean" or "sum" (empty with "none"),
and it still runs the backward -- as long as one rank has anchors. The feature dimension, dtype
and device type must be the same on every rank, and the features must require grad on every rank
or on none. These travel with the local sizes in one small collective before any data moves: a
disagreement, or an empty batch on every rank, raises the same ValueError on every rank. The
anchors must be on a device the group's backend handles (gloo: CPU, NCCL: CUDA). That exchange
is the only host synchronization; with a group that takes CPU tensors (gloo, "cpu:gloo,cuda:nccl")
it runs on the CPU and does not wait for the device. It reads the sizes on the host: this path is
meant for eager mode, not for torch.compile's fullgraph.
"""

from __future__ import annotations

import torch

# Bytes kept of a dtype or device-type name in the metadata row ("torch.float8_e4m3fnuz" is 21).
_NAME_WIDTH = 32


def _dist():
    import torch.distributed as dist

    return dist


def _flat_collectives():
    """(all-gather, reduce-scatter) on one flat tensor. torch 2.13 renamed all_gather_into_tensor /
    reduce_scatter_tensor to all_gather_single / reduce_scatter_single and warns (FutureWarning)
    on every call of the old names; 2.11 and 2.12 have only the old names. Gloo implements both
    since torch 2.2 (a gather into chunks; an all_reduce, then this rank's chunk) and NCCL
    natively, so every backend takes this one path."""
    dist = _dist()
    if hasattr(dist, "all_gather_single"):
        return dist.all_gather_single, dist.reduce_scatter_single
    return dist.all_gather_into_tensor, dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """All-gather of equal-sized [n, ...] tensors into [world·n, ...] in rank order; the backward
    sums the gradient over the ranks and keeps this rank's slice (a reduce-scatter): the gradient
    of the sum of all ranks' losses.

    Written by hand, not torch.distributed.nn.functional.all_gather: in torch 2.13 that function
    is deprecated and warns (FutureWarning) on every call, pointing to the private
    torch.distributed._functional_collectives, whose own autograd gather was renamed in 2.13 too
    (all_gather_tensor_autograd, now warning, -> all_gather_single_autograd, new in 2.13): no
    differentiable gather that is public and silent spans torch 2.11-2.14. It also gathers into
    a list of equal shapes (the padding below stays), and on gloo its backward emulates the
    reduce-scatter with one scatter per rank and W stacked gradient copies, where this one
    makes a single reduce_scatter."""

    @staticmethod
    def forward(ctx, rows, world, group):
        ctx.world, ctx.group = world, group
        all_gather, _ = _flat_collectives()
        gathered = rows.new_empty((world * rows.shape[0],) + tuple(rows.shape[1:]))
        all_gather(gathered, rows.contiguous(), group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad):
        _, reduce_scatter = _flat_collectives()
        mine = grad.new_empty((grad.shape[0] // ctx.world,) + tuple(grad.shape[1:]))
        reduce_scatter(mine, grad.contiguous(), group=ctx.group)
        return mine, None, None


def _all_gather_rows(rows: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """The rows of every rank (rank r holds sizes[r]) concatenated in rank order; differentiable."""
    longest = max(sizes)
    if rows.shape[0] < longest:  # the collective takes equal sizes: pad to the longest, unpad after
        rows = torch.cat([rows, rows.new_zeros((longest - rows.shape[0],) + tuple(rows.shape[1:]))])
    gathered = _AllGather.apply(rows, len(sizes), group)
    if min(sizes) == longest:
        return gathered
    return torch.cat([part[:size] for part, size in zip(gathered.split(longest), sizes)])


def _metadata_device(group, anchors: torch.Tensor) -> torch.device:
    """Where this rank's metadata row goes: a device the group takes whatever device the anchors
    are on, so that a rank with anchors on another device still joins the exchange and hears of
    the mismatch instead of failing alone. The CPU when the group takes it (gloo,
    "cpu:gloo,cuda:nccl": no device sync), else the anchors' device, else the current accelerator.
    The device types come from group._device_types, what torch's own object collectives use:
    get_backend() says "undefined" for a group initialized without naming a backend."""
    device_types = {device.type for device in group._device_types}
    if "cpu" in device_types:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if not device_types or anchors.device.type in device_types or accelerator is None:
        return anchors.device
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _encode(name: str) -> list[int]:
    codes = list(name.encode()[:_NAME_WIDTH])
    return codes + [0] * (_NAME_WIDTH - len(codes))


def _decode(codes: list[int]) -> str:
    return bytes(code for code in codes if code).decode()


def _by_rank(values: list) -> str:
    """'float64 on ranks [0, 2], float32 on ranks [1]'"""
    ranks: dict = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    return ", ".join(f"{value} on ranks {members}" for value, members in ranks.items())


def _check_agreement(rows: list[list[int]]) -> list[int]:
    """The local sizes, from every rank's metadata row; raises when the anchors cannot be gathered.
    Every rank decides from the same rows, so every rank raises the same ValueError, before any
    data collective: none is left waiting and none aborts on mismatched buffers."""
    width = _NAME_WIDTH
    sizes = [row[0] for row in rows]
    properties = {
        "feature dimension": [row[1] for row in rows],
        "requires grad": [bool(row[2]) for row in rows],
        "dtype": [_decode(row[3 : 3 + width]).removeprefix("torch.") for row in rows],
        "device type": [_decode(row[3 + width : 3 + 2 * width]) for row in rows],
    }
    disagree = [f"{name}: {_by_rank(values)}" for name, values in properties.items()
                if len(set(values)) > 1]
    if disagree:
        raise ValueError(
            "features: every rank of process_group must pass features of the same feature "
            "dimension, dtype and device type, all requiring grad or none (the backward joins a "
            "collective); got " + "; ".join(disagree)
        )
    if not any(sizes):
        raise ValueError(
            f"features: every rank of process_group has an empty batch (local sizes {sizes}); "
            "at least one rank needs anchors"
        )
    return sizes


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
    """(all anchors [N_all, d], their labels [N_all], offset of this rank's first anchor in them).

    On one process (process_group=None) the columns are the local anchors themselves and the
    offset is 0. With a process group the anchors of every rank are gathered in rank order (rank
    0's N_0 rows, then rank 1's, ...); local sizes may differ and may be 0 as long as one rank has
    anchors. The gather is differentiable and its backward returns to each rank the sum over all
    ranks of the gradients of its rows (see the module docstring for the resulting loss/gradient
    convention). Labels are gathered without gradient.

    First every rank exchanges one small row (size, feature dimension, whether the anchors require
    grad, dtype, device type): a disagreement, or an empty batch on every rank, raises the same
    ValueError on every rank.
    """
    if process_group is None:
        return anchors, labels, 0
    _check_group(process_group)
    dist = _dist()
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    needs_grad = torch.is_grad_enabled() and anchors.requires_grad
    row = [anchors.shape[0], anchors.shape[1], int(needs_grad), *_encode(str(anchors.dtype)),
           *_encode(anchors.device.type)]
    if world > 1:
        device = _metadata_device(process_group, anchors)
        mine = torch.tensor([row], dtype=torch.int64, device=device)
        rows = _all_gather_rows(mine, [1] * world, process_group).tolist()
    else:
        rows = [row]
    sizes = _check_agreement(rows)
    if world == 1:
        return anchors, labels, 0
    all_anchors = _all_gather_rows(anchors, sizes, process_group)
    all_labels = _all_gather_rows(labels, sizes, process_group)
    return all_anchors, all_labels, sum(sizes[:rank])
