"""Shared test helpers: random inputs of every awkward kind and the correctness rule of DESIGN §4."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from rcl_kernels.dispatch import BACKENDS
from rcl_kernels.selftest import FLOORS, relative_error, rule_check  # noqa: F401 (tests import them)


def assert_within_rule(name: str, value, low_precision_reference, truth, dtype, magnitude=0.0, *,
                       floor: float | None = None):
    """The one accuracy rule of DESIGN §4 (rcl_kernels.selftest.rule_check): the relative-norm
    error against float64 at most 2x the error of the reference run in the same dtype, plus the
    dtype's floor (selftest.FLOORS; `floor` only where a caller says why it needs another).

    Entries where the truth is not finite (an lse of -inf for a row without columns) must be the
    same non-finite value in the result and in the low-precision reference; the rule compares the
    finite entries."""
    value, low, truth = (t.detach().double().cpu() for t in (value, low_precision_reference, truth))
    assert value.shape == truth.shape, f"{name}: shape {tuple(value.shape)} != {tuple(truth.shape)}"
    for what, other in (("result", value), ("low-precision reference", low)):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(other), kind(truth)), f"{name}: {what}'s {kind.__name__} pattern"
    finite = torch.isfinite(truth)
    err, allowed = rule_check(value[finite], low[finite], truth[finite], dtype, magnitude, floor)
    assert err <= allowed, f"{name}: relative error {err:.3e} > allowed {allowed:.3e} ({dtype})"


def draw_labels(kind: str, n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels of n samples: uniform; long-tailed (exponential profile, ρ=100); all one class;
    only a tenth of the classes present (most absent); all distinct (no positive without
    prototypes or a second view)."""
    if kind == "uniform":
        return torch.randint(0, num_classes, (n,), generator=generator)
    if kind == "longtail":
        weights = 0.01 ** (torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1))
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    if kind == "one_class":
        return torch.full((n,), int(torch.randint(0, num_classes, (1,), generator=generator)))
    if kind == "few_present":
        present = torch.randperm(num_classes, generator=generator)[: max(1, num_classes // 10)]
        return present[torch.randint(0, len(present), (n,), generator=generator)]
    if kind == "distinct":
        assert n <= num_classes, "distinct labels need n <= num_classes"
        return torch.randperm(num_classes, generator=generator)[:n]
    raise ValueError(f"unknown label draw {kind!r}")


def fresh_generator() -> torch.Generator:
    """Seeded from the OS: fresh inputs every run. The seed is printed; RCL_TEST_SEED=<seed>
    replays a failure."""
    seed = int(os.environ.get("RCL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"input seed: {seed}")
    return torch.Generator().manual_seed(seed)


def random_features(shape, generator, *, normalize=True) -> torch.Tensor:
    """Float64 features (unit rows by default, as the losses are used), never zeros."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def backend_kwargs(spec: str) -> dict:
    """"cpu" or "cpu:tiled" -> the backend= and algorithm= arguments of the losses."""
    name, _, algorithm = spec.partition(":")
    return {"backend": name, "algorithm": algorithm or "auto"}


def backend_param(spec: str, device: str = "cpu"):
    """pytest.param for a backend ("name" or "name:algorithm") on a device, skipped with the reason
    when it cannot run there."""
    name = backend_kwargs(spec)["backend"]
    if device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        reason = BACKENDS[name].unavailable_reason(torch.device(device))
        if reason is None and device not in BACKENDS[name].device_types:
            reason = f"runs on {'/'.join(BACKENDS[name].device_types)} tensors here"
    marks = [pytest.mark.skip(reason=f"{spec}: {reason}")] if reason else []
    if name == "triton" and device == "cpu":
        marks.append(pytest.mark.triton_interpret)
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(spec, marks=marks, id=f"{spec}-{device}")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spawn_and_wait(fn, world, args, timeout_s):
    """mp.spawn `fn(rank, *args)` on `world` processes; terminate them all after `timeout_s`."""
    context = mp.spawn(fn, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
