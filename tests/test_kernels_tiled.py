"""The tiled algorithm's ops (rcl_kernels.kernels.tiled; csrc/tiled, csrc/cpu) against float64:
every output of tiled_loss_forward_backward against float64 autograd of its contract, the CPU
driver's panels at one and two threads, each ISA variant of the CPU epilogue, and empty or
single-row ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import fresh_generator, random_features

import rcl_kernels as rk
from rcl_kernels._dtypes import accumulation_dtype

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] is not None, reason="rcl_kernels._C not built")


def op(name):
    return getattr(torch.ops.rcl_kernels, name).default


@pytest.mark.parametrize("n", [0, 1])
def test_tiled_ops_take_an_empty_or_single_row(n):
    """A rank of a process group may hold no anchors: its columns are the other ranks'."""
    gen = fresh_generator()
    k = random_features((7, 5), gen)
    z = k[:n].clone()
    labels, col_labels = torch.zeros(n, dtype=torch.long), torch.arange(7) % 2
    row_bias, col_bias = torch.zeros(n, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    weights = torch.ones(n, dtype=torch.float64)
    lse, positive_dots, dz, dk = op("tiled_loss_forward_backward")(
        weights, z, k, labels, col_labels, row_bias, col_bias, 0, 2.0, 4)
    assert lse.shape == positive_dots.shape == (n,) and dz.shape == (n, 5) and dk.shape == (7, 5)
    if n == 0:
        assert torch.equal(dk, torch.zeros_like(dk))
    else:
        expected = torch.logsumexp(2.0 * (z @ k[1:].T), dim=1)  # the self column 0 is masked
        torch.testing.assert_close(lse, expected)


def dense_weighted_loss(weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset,
                        scale):
    """tiled_loss_forward_backward's contract (csrc/ops.cpp) in float64 with N x M matrices and
    autograd: (lse, positive_sum, dz, dk) of Σ_i w_i·(lse_i − scale·positive_sum_i / |Pos(i)|)."""
    z, k = (t.detach().double().requires_grad_() for t in (z, k))
    scores = z @ k.T
    same = row_labels[:, None] == col_labels[None, :]
    self_column = torch.arange(k.shape[0])[None, :] == (torch.arange(z.shape[0]) + self_offset)[:, None]
    logits = scale * scores + torch.where(same, row_bias.double()[:, None], col_bias.double()[None, :])
    lse = torch.logsumexp(logits.masked_fill(self_column, float("-inf")), dim=1)
    positive = same & ~self_column
    positive_sum = (scores * positive).sum(dim=1)
    loss = (weights.double() * (lse - scale * positive_sum / positive.sum(dim=1).clamp(min=1))).sum()
    dz, dk = torch.autograd.grad(loss, (z, k))
    return lse.detach(), positive_sum.detach(), dz, dk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_rows", [1, 5, 64])
@pytest.mark.parametrize("self_offset", [0, 3, -40], ids=["self", "shifted", "no-self"])
def test_tiled_loss_forward_backward_vs_float64(dtype, block_rows, self_offset):
    """Every output of the one-pass op against float64 autograd of its contract: several row
    blocks, self columns at, after or outside the anchors, a class with one member (rows without
    a positive), zero and negative weights."""
    gen = fresh_generator()
    n, m, d = 11, 17, 6
    z, k = random_features((n, d), gen).to(dtype), random_features((m, d), gen).to(dtype)
    row_labels = torch.tensor([0, 1, 1, 2, 0, 3, 1, 0, 2, 2, 1])  # class 3: one anchor
    col_labels = torch.cat([row_labels, torch.tensor([0, 1, 4, 2, 0, 1])])
    acc = accumulation_dtype(dtype)
    row_bias = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
    col_bias = torch.randn(m, generator=gen, dtype=torch.float64).to(acc)
    weights = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
    weights[2] = 0
    args = (weights, z, k, row_labels, col_labels, row_bias, col_bias, self_offset, 2.5)
    got = op("tiled_loss_forward_backward")(*args, block_rows)
    want = dense_weighted_loss(*args)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    for name, value, truth in zip(("lse", "positive_sum", "dz", "dk"), got, want):
        assert value.dtype == acc, name
        torch.testing.assert_close(value.double(), truth, rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_rows", [2100, 1100])
def test_tiled_cpu_panels_vs_float64(threads, block_rows):
    """Enough rows for the CPU driver's panels (256 rows; two threads pull them from a counter, the
    last ones in halves when there are four or more; one thread runs them in order): one block
    of nine row panels, or two blocks of five and four, with a last panel and a last block that are
    partial, and nine dk panels: every output of the one-pass op and the forward's lse against
    float64."""
    gen = fresh_generator()
    n, m, d = 2100, 2300, 8
    z, k = random_features((n, d), gen).float(), random_features((m, d), gen).float()
    row_labels = torch.randint(0, 7, (n,), generator=gen)
    col_labels = torch.cat([row_labels, torch.randint(0, 9, (m - n,), generator=gen)])
    row_bias = torch.randn(n, generator=gen)
    col_bias = torch.randn(m, generator=gen)
    weights = torch.randn(n, generator=gen)
    args = (weights, z, k, row_labels, col_labels, row_bias, col_bias, 0, 4.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = op("tiled_loss_forward_backward")(*args, block_rows)
        lse = op("tiled_lse_forward")(*args[1:], block_rows)
    finally:
        torch.set_num_threads(previous)
    want = dense_weighted_loss(*args)
    torch.testing.assert_close(lse, got[0], rtol=0, atol=0)
    for name, value, truth in zip(("lse", "positive_sum", "dz", "dk"), got, want):
        torch.testing.assert_close(value.double(), truth, rtol=2e-5, atol=2e-5, msg=name)


CPU_VARIANT_SCRIPT = """
import json, sys, torch, rcl_kernels as rk
torch.manual_seed(0)
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for dtype in (torch.float32, torch.float64):
    f = torch.nn.functional.normalize(torch.randn(70, 2, 37, dtype=dtype), dim=-1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(9, 37, dtype=dtype), dim=-1).requires_grad_()
    y = torch.randint(0, 9, (70,))
    loss = rk.bcl_loss(f, y, c, backend="cpu", algorithm="tiled")
    loss.backward()
    out[str(dtype)] = [loss.item(), f.grad.double().norm().item(), c.grad.double().norm().item()]
    f64, c64 = f.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref = rk.bcl_loss(f64, y, c64, backend="reference")
    ref.backward()
    out[str(dtype) + "-error"] = max(
        abs(loss.item() - ref.item()) / abs(ref.item()),
        ((f.grad.double() - f64.grad).norm() / f64.grad.norm()).item(),
        ((c.grad.double() - c64.grad).norm() / c64.grad.norm()).item())
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_tiled_cpu_epilogue_variants(capability):
    """Each ISA variant of the tiled CPU epilogue (chosen like PyTorch's own kernels, from
    ATEN_CPU_CAPABILITY or the CPU's features) against the float64 reference."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", CPU_VARIANT_SCRIPT], env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if out["capability"].lower() != capability:
        pytest.skip(f"this CPU runs {out['capability']}, not {capability}")
    assert out["torch.float32-error"] < 1e-5
    assert out["torch.float64-error"] < 1e-12
