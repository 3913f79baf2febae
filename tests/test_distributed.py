"""Distributed contrast (`process_group=`) against the single-process computation, on the CPU.

2 and 4 processes (torch.multiprocessing spawn, gloo, tcp://127.0.0.1 on a free port). All cases
of one world size run in one spawn (starting processes is the expensive part); every worker
records the mismatches of each case instead of raising, so that a failing case neither hangs the
other ranks nor hides the other cases, and the parametrized tests below report per case.

Convention checked (rcl_kernels/distributed.py): rank r's loss L_r is the mean over its own
anchors that have a positive, counts and positives over every rank's columns; the gradient that
reaches rank r's features is that of Σ_q L_q; rank r's prototype gradient is that of L_r. The
oracle is one float64 reference computation on the concatenation of every rank's flattened
anchors in rank order (the global column order), reduction="none", split per rank. In addition
the size-weighted mean of the L_r is compared with the plain single-process mean on the
[ΣB, V, d] concatenation, and DistributedDataParallel on a small model is compared with
the single-process gradients of the same model on the global batch.

Cases: presets supcon, bcl, rcl (on BCL, tail margins), rcl standalone; backends reference and cpu
in float64 (tolerance 1e-8), cpu and Triton (interpreter; skipped with the reason when it cannot
run) in float32 (1e-4); equal and unequal local sizes; [B, V, d] and [N, d] inputs. With 2 GPUs
the same checks run over NCCL for reference, cuda and triton (marked gpu, skipped otherwise).

Hostile inputs (2 processes, a spawn of their own so that a crash cannot take the matrix down):
ranks that disagree on dtype, device type or requires_grad, or that all have an empty batch,
must raise the same ValueError on every rank (no abort, no hang); a rank with an empty batch
takes part like any other (loss 0, its backward joins the collective) and the others match the
single-process oracle.
"""

from __future__ import annotations

import datetime
import json
import os
import re

import pytest
import torch
from helpers import free_ports, spawn_and_wait
import torch.nn.functional as F

import rcl_kernels as rk

NUM_CLASSES, DIM, VIEWS, IN_DIM = 5, 8, 2, 6
CLASS_COUNTS = [50, 20, 10, 5, 2]
PRESETS = ("supcon", "bcl", "rcl", "rcl_standalone")
BACKENDS = ("reference", "cpu")
# (rtol, atol) against the float64 oracle, by the dtype the distributed side computes in
TOLERANCE = {"float64": (1e-8, 1e-10), "float32": (1e-4, 1e-5)}
SPAWN_TIMEOUT_S = 150


def _loss(preset, features, labels, prototypes, **kwargs):
    if preset == "supcon":
        return rk.supcon_loss(features, labels, **kwargs)
    if preset == "bcl":
        return rk.bcl_loss(features, labels, prototypes, **kwargs)
    if preset == "rcl":  # RCL on BCL, with feature scale and tail margins
        return rk.rcl_loss(features, labels, prototypes, CLASS_COUNTS, feature_scale=1.5,
                           tail_margin=0.3, **kwargs)
    if preset == "rcl_standalone":  # no prototypes, Balanced-Softmax bias and margins only
        return rk.rcl_loss(features, labels, None, CLASS_COUNTS, feature_scale=1.5,
                           tail_margin=0.3, **kwargs)
    raise AssertionError(preset)


def _uses_prototypes(preset):
    return preset in ("bcl", "rcl")


def _cases(world):
    """(id, spec) of every case of a world size; spec is JSON-able and seeds its own data."""
    cases = []
    equal = [3] * world
    unequal = [2, 5] if world == 2 else [1, 3, 2, 4]
    for preset in PRESETS:
        for backend in BACKENDS:
            for name, sizes in (("equal", equal), ("unequal", unequal)):
                cases.append(dict(kind="loss", preset=preset, backend=backend, layout="bvd",
                                  sizes=sizes))
            if world == 2:  # [N, d] anchors: some anchors have no positive
                cases.append(dict(kind="loss", preset=preset, backend=backend, layout="nd",
                                  sizes=[6, 9]))
        if world == 2:  # float32; Triton through its interpreter (reported as skipped if broken)
            for backend in ("cpu", "triton"):
                cases.append(dict(kind="loss", preset=preset, backend=backend, layout="bvd",
                                  sizes=unequal, dtype="float32"))
        if world == 2:
            cases.append(dict(kind="ddp", preset=preset, backend="cpu", sizes=equal,
                              reduction="mean"))
            cases.append(dict(kind="ddp", preset=preset, backend="cpu", sizes=unequal,
                              reduction="sum"))
    return _named(cases, seed=1000 * world)


def _gpu_cases():
    """NCCL on 2 GPUs: every preset and GPU backend, equal, unequal and empty local sizes, and
    DDP; ranks that disagree (the metadata goes through the GPU, the odd rank's too)."""
    cases = _disagree_specs()
    for preset in PRESETS:
        for backend, dtype in (("reference", "float64"), ("cuda", "float64"), ("triton", "float32")):
            for sizes in ([3, 3], [2, 5], [0, 5]):
                cases.append(dict(kind="loss", preset=preset, backend=backend, layout="bvd",
                                  sizes=sizes, dtype=dtype))
        cases.append(dict(kind="ddp", preset=preset, backend="auto", sizes=[3, 3], reduction="mean"))
        cases.append(dict(kind="ddp", preset=preset, backend="auto", sizes=[2, 5], reduction="sum"))
    return _named(cases, seed=99000)


# case -> the ValueError every rank must raise when the ranks' features cannot be gathered
DISAGREEMENTS = {
    "dtype": r"features: .*dtype: float64 on ranks \[0\], float32 on ranks \[1\]",
    "device_type": r"features: .*device type: {device} on ranks \[0\], meta on ranks \[1\]",
    "requires_grad": r"features: .*requires grad: True on ranks \[0\], False on ranks \[1\]",
    "all_empty": r"features: .*empty batch",
}


def _disagree_specs():
    return [dict(kind="disagree", what=what, backend="reference", sizes=[3, 3])
            for what in DISAGREEMENTS]


def _hostile_cases():
    """2 processes: ranks that disagree (every rank raises), then one rank with an empty batch."""
    cases = _disagree_specs()
    for preset in PRESETS:
        for backend in BACKENDS:
            cases.append(dict(kind="loss", preset=preset, backend=backend, layout="bvd",
                              sizes=[0, 5]))
        cases.append(dict(kind="loss", preset=preset, backend="cpu", layout="nd", sizes=[9, 0]))
        cases.append(dict(kind="loss", preset=preset, backend="triton", layout="bvd", sizes=[4, 0],
                          dtype="float32"))
        cases.append(dict(kind="ddp", preset=preset, backend="cpu", sizes=[0, 5], reduction="sum"))
    return _named(cases, seed=77000)


def _named(cases, seed):
    out = []
    for index, spec in enumerate(cases):
        spec["seed"] = seed + index
        spec.setdefault("dtype", "float64")
        parts = [spec["kind"], spec.get("what", ""), spec.get("preset", ""), spec["backend"],
                 spec.get("layout", ""), "x".join(map(str, spec["sizes"]))]
        if spec["dtype"] != "float64":
            parts.append(spec["dtype"])
        if "reduction" in spec:
            parts.append(spec["reduction"])
        out.append(("-".join(p for p in parts if p), spec))
    return out


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------
def _compare(errors, what, got, expected, dtype="float64"):
    if got is None or expected is None:
        if (got is None) != (expected is None):
            errors.append(f"{what}: got {got}, expected {expected}")
        return
    rtol, atol = TOLERANCE[dtype]
    got, expected = got.double(), expected.double()
    if got.shape != expected.shape:
        errors.append(f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
    elif not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item()
        errors.append(f"{what}: max abs diff {diff:.3e} (|expected|max {expected.abs().max().item():.3e})")


def _flatten(features):
    """A rank's anchors in the loss's own order: [B, V, d] view-major, [N, d] as is."""
    if features.dim() == 3:
        return features.transpose(0, 1).reshape(-1, features.shape[-1])
    return features


def _labels_flat(features, labels):
    return labels.repeat(features.shape[1]) if features.dim() == 3 else labels


def _make_data(spec, world, device):
    """Every rank's features and labels and the prototypes: float64 on `device` (drawn on the CPU)."""
    g = torch.Generator().manual_seed(spec["seed"])
    features, labels = [], []
    for r in range(world):
        b = spec["sizes"][r]
        shape = (b, VIEWS, DIM) if spec["layout"] == "bvd" else (b, DIM)
        features.append(F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1))
        labels.append(torch.randint(0, NUM_CLASSES, (b,), generator=g))
    prototypes = F.normalize(torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64), dim=-1)
    move = lambda t: t.to(device)  # noqa: E731
    return list(map(move, features)), list(map(move, labels)), move(prototypes)


def _case_loss(spec, rank, world, group, device):
    import torch.distributed as dist

    errors = []
    preset, backend, dtype = spec["preset"], spec["backend"], spec["dtype"]
    features, labels, prototypes = _make_data(spec, world, device)
    with_protos = _uses_prototypes(preset)

    # distributed, in the case's dtype
    mine = features[rank].to(getattr(torch, dtype)).requires_grad_()
    protos = prototypes.to(getattr(torch, dtype)).requires_grad_()
    loss = _loss(preset, mine, labels[rank], protos, backend=backend, process_group=group)
    loss.backward()

    # oracle: the concatenation of every rank's flattened anchors, in rank order
    rows = torch.cat([_flatten(f) for f in features]).requires_grad_()
    row_labels = torch.cat([_labels_flat(f, y) for f, y in zip(features, labels)])
    protos_sp = prototypes.clone().requires_grad_()
    per_anchor = _loss(preset, rows, row_labels, protos_sp, backend="reference", reduction="none")
    column_count = torch.bincount(row_labels, minlength=NUM_CLASSES) + int(with_protos)
    has_positive = column_count[row_labels] > 1
    bounds = [0]
    for f in features:
        bounds.append(bounds[-1] + _flatten(f).shape[0])
    per_rank = [per_anchor[a:b].sum() / has_positive[a:b].sum().clamp(min=1)
                for a, b in zip(bounds[:-1], bounds[1:])]
    (row_grad,) = torch.autograd.grad(sum(per_rank), rows, retain_graph=True)
    mine_rows = slice(bounds[rank], bounds[rank + 1])
    mine_grad = row_grad[mine_rows]
    if mine.dim() == 3:  # view-major rows back to [B, V, d] (B may be 0: no -1 in the shape)
        mine_grad = mine_grad.reshape(VIEWS, mine.shape[0], DIM).transpose(0, 1)
    _compare(errors, "loss", loss.detach(), per_rank[rank].detach(), dtype)
    # reduction="none": this rank's rows of the single-process result; "sum": their sum
    mine_per_anchor = per_anchor[mine_rows].detach()
    for reduction, expected in (("none", mine_per_anchor), ("sum", mine_per_anchor.sum())):
        with torch.no_grad():
            got = _loss(preset, mine, labels[rank], protos, backend=backend, process_group=group,
                        reduction=reduction)
        _compare(errors, f"reduction={reduction}", got, expected, dtype)
    _compare(errors, "feature grad (of the sum of all ranks' losses)", mine.grad, mine_grad, dtype)
    if with_protos:
        (proto_grad,) = torch.autograd.grad(per_rank[rank], protos_sp)
        _compare(errors, "prototype grad (of this rank's loss)", protos.grad, proto_grad, dtype)
    elif protos.grad is not None:
        errors.append("prototype grad: expected none for a preset without prototypes")

    # Σ_r P_r·L_r / P equals the single-process mean; for [B, V, d] that is also the plain mean on
    # the [ΣB, V, d] concatenation (the reduced loss does not depend on the anchors' order).
    p_mine = has_positive[mine_rows].sum().to(torch.float64)
    totals = torch.stack([loss.detach().double() * p_mine, p_mine])
    dist.all_reduce(totals, group=group)
    if spec["layout"] == "bvd":
        single = _loss(preset, torch.cat(features), torch.cat(labels), prototypes, backend="reference")
    else:
        single = _loss(preset, rows.detach(), row_labels, prototypes, backend="reference")
    _compare(errors, "size-weighted mean of the rank losses vs single-process mean",
             totals[0] / totals[1], single, dtype)
    return errors


def _case_disagree(spec, rank, world, group, device):
    """The last rank's features differ from the others' (or every batch is empty): every rank must
    raise the same ValueError, naming features and what each rank had, before any data moves."""
    import torch.distributed as dist

    from rcl_kernels.distributed import gather_anchors

    what, odd = spec["what"], rank == world - 1
    g = torch.Generator().manual_seed(spec["seed"])
    features = torch.randn(3, VIEWS, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (3,), generator=g)
    features = F.normalize(features, dim=-1).to(device)
    features.requires_grad_(what != "requires_grad" or not odd)
    if what == "dtype" and odd:
        features = features.float()
    if what == "all_empty":
        features, labels = features[:0], labels[:0]
    try:
        if what == "device_type":
            # The losses refuse meta tensors before the gather (backend selection); the gather
            # itself must exchange its metadata without touching the odd rank's device.
            anchors = _flatten(features)
            gather_anchors(anchors.to("meta") if odd else anchors, labels.repeat(VIEWS), group)
        else:
            _loss("supcon", features, labels, None, backend=spec["backend"], process_group=group)
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - the outcome is what is checked
        outcome = f"{type(error).__name__}: {error}"
    outcomes = [None] * world
    dist.all_gather_object(outcomes, outcome, group=group)
    errors = []
    if len(set(outcomes)) > 1:
        errors.append(f"the ranks differ: {outcomes}")
    expected = DISAGREEMENTS[what].format(device=device.type)
    if not re.fullmatch(f"ValueError: {expected}.*", outcome, flags=re.DOTALL):
        errors.append(f"expected a ValueError matching {expected!r}, got {outcome}")
    return errors


class _TinyModel(torch.nn.Module):
    """A projection to normalized features and class centers made from a parameter (as BCL's
    normalize(head_fc(W))): both the gathered path and the replicated-prototype path."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
        self.weight = torch.nn.Parameter(torch.randn(NUM_CLASSES, IN_DIM, dtype=torch.float64))
        self.head = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)

    def forward(self, x):
        return F.normalize(self.proj(x), dim=-1), F.normalize(self.head(self.weight), dim=-1)


def _case_ddp(spec, rank, world, group, device):
    """DDP gradient averaging on top of the distributed loss == the single-process gradient."""
    from torch.nn.parallel import DistributedDataParallel

    errors = []
    preset, sizes = spec["preset"], spec["sizes"]
    g = torch.Generator().manual_seed(spec["seed"])
    inputs = [torch.randn(b, VIEWS, IN_DIM, generator=g, dtype=torch.float64).to(device)
              for b in sizes]
    labels = [torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device) for b in sizes]
    torch.manual_seed(spec["seed"])
    reference_model = _TinyModel().to(device)
    model = _TinyModel().to(device)
    model.load_state_dict(reference_model.state_dict())
    # supcon leaves the center parameters unused: DDP must be told, or it skips the bucket
    ddp = DistributedDataParallel(model, process_group=group,
                                  device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=not _uses_prototypes(preset))

    z, protos = ddp(inputs[rank])
    if spec["reduction"] == "mean":
        # equal sizes, every anchor has a positive (2 views): DDP's average is the global mean
        loss = _loss(preset, z, labels[rank], protos, backend=spec["backend"], process_group=group)
    else:
        # unequal sizes: the exact recipe, sum × W / P (every anchor has a positive: P = Σ N_r)
        total = VIEWS * sum(sizes)
        loss = _loss(preset, z, labels[rank], protos, backend=spec["backend"], process_group=group,
                     reduction="sum") * (world / total)
    loss.backward()

    z_all, protos_all = reference_model(torch.cat(inputs))
    single = _loss(preset, z_all, torch.cat(labels), protos_all, backend="reference")
    single.backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference_model.parameters()):
        _compare(errors, f"DDP-averaged grad of {name} vs single process", p.grad, p_ref.grad)
    return errors


def _backend_skip_reason(backend, dtype, device, cache):
    """Why a fused backend cannot run a tiny single-process loss here (None when it can)."""
    if backend in ("reference", "auto"):
        return None
    if (backend, dtype) not in cache:
        try:
            f = F.normalize(torch.randn(3, VIEWS, DIM, dtype=getattr(torch, dtype), device=device),
                            dim=-1).requires_grad_()
            rk.supcon_loss(f, torch.tensor([0, 1, 0], device=device), backend=backend).backward()
            cache[backend, dtype] = None
        except Exception as error:  # noqa: BLE001 - the reason is reported as the skip message
            cache[backend, dtype] = f"{type(error).__name__}: {str(error)[:300]}"
    return cache[backend, dtype]


def _worker(rank, world, port, out_dir, cases, dist_backend="gloo"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    device = torch.device("cpu")
    if dist_backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results, probes = {}, {}
    try:
        group = dist.group.WORLD
        for case_id, spec in cases:
            reason = _backend_skip_reason(spec["backend"], spec["dtype"], device, probes)
            if reason is not None:  # the same on every rank: no collective is left waiting
                results[case_id] = [f"SKIP: backend {spec['backend']} ({spec['dtype']}): {reason}"]
                continue
            try:
                run = {"loss": _case_loss, "ddp": _case_ddp, "disagree": _case_disagree}
                results[case_id] = run[spec["kind"]](spec, rank, world, group, device)
            except Exception as error:  # recorded; the next collective re-synchronizes or times out
                results[case_id] = [f"raised {type(error).__name__}: {error}"]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Launcher side
# --------------------------------------------------------------------------------------------------
_RESULTS: dict[tuple, dict] = {}


def _results(world, tmp_path_factory, family="gloo"):
    """The results of one spawn: family "gloo" (the matrix of a world size), "hostile" or "nccl"."""
    key = (world, family)
    if key not in _RESULTS:
        out_dir = str(tmp_path_factory.mktemp(f"dist{world}{family}"))
        cases = {"hostile": _hostile_cases, "nccl": _gpu_cases}.get(family, lambda: _cases(world))()
        dist_backend = "nccl" if family == "nccl" else "gloo"
        try:
            spawn_and_wait(_worker, world, (world, free_ports(1)[0], out_dir, cases, dist_backend),
                           SPAWN_TIMEOUT_S)
            merged = {}
            for rank in range(world):
                with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                    for case_id, errors in json.load(f).items():
                        merged.setdefault(case_id, []).extend(f"rank {rank}: {e}" for e in errors)
            _RESULTS[key] = merged
        except Exception as error:
            _RESULTS[key] = {"__spawn__": f"{type(error).__name__}: {error}"}
    return _RESULTS[key]


def _check(results, case_id):
    assert "__spawn__" not in results, results.get("__spawn__")
    assert case_id in results, f"case {case_id} did not run"
    errors = results[case_id]
    skips = [e for e in errors if "SKIP: " in e]
    if skips:
        pytest.skip(skips[0].split("SKIP: ", 1)[1])
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize(
    "world,case_id",
    [(w, case_id) for w in (2, 4) for case_id, _ in _cases(w)],
)
def test_matches_single_process(world, case_id, tmp_path_factory):
    _check(_results(world, tmp_path_factory), case_id)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("case_id", [case_id for case_id, _ in _gpu_cases()])
def test_matches_single_process_nccl(case_id, tmp_path_factory):
    _check(_results(2, tmp_path_factory, "nccl"), case_id)


@pytest.mark.parametrize("case_id", [case_id for case_id, _ in _hostile_cases()])
def test_hostile_inputs(case_id, tmp_path_factory):
    _check(_results(2, tmp_path_factory, "hostile"), case_id)


def test_uninitialized_group_is_a_value_error():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    features = torch.randn(4, 2, DIM)
    with pytest.raises(ValueError, match="process_group"):
        rk.supcon_loss(features, torch.tensor([0, 1, 0, 1]), process_group=object())
