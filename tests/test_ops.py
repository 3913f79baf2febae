"""The kernel ops (opcheck, fake kernels), gradcheck, torch.func, determinism and property tests."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_param, draw_labels, fresh_generator, random_features
from hypothesis import given, settings
from hypothesis import strategies as st

import rcl_kernels as rk
from rcl_kernels._dtypes import accumulation_dtype

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] is not None, reason="rcl_kernels._C not built")


def op_inputs(n=12, d=10, num_classes=4, prototypes=True, dtype=torch.float64, requires_grad=True):
    gen = fresh_generator()
    z = random_features((n, d), gen).to(dtype)
    labels = draw_labels("uniform", n, num_classes, gen)
    k, col_labels = z, labels
    if prototypes:
        k = torch.cat([z, random_features((num_classes, d), gen).to(dtype)])
        col_labels = torch.cat([labels, torch.arange(num_classes)])
    k = k.detach().clone().requires_grad_(requires_grad)
    z = z.detach().clone().requires_grad_(requires_grad)
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(accumulation_dtype(dtype))
    margin = torch.rand(num_classes, generator=gen, dtype=torch.float64).to(bias.dtype)
    return z, k, labels, col_labels, bias, margin


def lse_args(dtype=torch.float64, n=12, d=10, num_classes=4):
    z, k, labels, col_labels, bias, _ = op_inputs(n=n, d=d, num_classes=num_classes, dtype=dtype,
                                                  requires_grad=False)
    return z, k, labels, col_labels, bias[labels], bias[col_labels]


# (forward op, backward op, extra forward args, extra backward args, dtypes, available here)
KERNEL_OPS = {
    "cpu": ("cpu_lse_forward", "cpu_lse_backward", (), (), [torch.float64, torch.float32]),
    # block_rows = 5: several row blocks at these sizes.
    "cpu:tiled": ("tiled_lse_forward", "tiled_lse_backward", (5,), (5,), [torch.float64, torch.float32]),
    "triton": ("triton_lse_forward", "triton_lse_backward", (False, "default"), (False, "default"),
               [torch.float32]),
}
KERNEL_BACKENDS = [backend_param("cpu"), backend_param("cpu:tiled"), backend_param("triton")]


def op(name):
    return getattr(torch.ops.rcl_kernels, name).default


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_kernel_ops(backend):
    forward, backward, fwd_extra, bwd_extra, dtypes = KERNEL_OPS[backend]
    for dtype in dtypes:
        args = lse_args(dtype)
        fwd_args = (*args, 0, 3.0, *fwd_extra)
        torch.library.opcheck(op(forward), fwd_args)
        lse = op(forward)(*fwd_args)
        torch.library.opcheck(op(backward), (torch.rand_like(lse), *args, lse, 0, 3.0, *bwd_extra))


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
@pytest.mark.parametrize("block_rows", [1100, 450])
def test_tiled_cpu_panels_vs_float64(threads, block_rows):
    """Enough rows for the CPU driver's panels (128 rows; two threads pull them from a counter, the
    last ones in halves when there are eight or more; one thread runs them in order), with a last
    panel and a last block that are partial: every output of the one-pass op and the forward's lse
    against float64."""
    gen = fresh_generator()
    n, m, d = 1100, 1403, 8
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


GPU_KERNEL_OPS = {
    "cuda": ("cuda_lse_forward", "cuda_lse_backward", (False, 2), (False, 2, 2)),
    "cuda-mma": ("cuda_mma_lse_forward", "cuda_mma_lse_backward", (False, 2), (False, 2)),
    "cuda:tiled": ("tiled_lse_forward", "tiled_lse_backward", (5,), (5,)),
    "triton": ("triton_lse_forward", "triton_lse_backward", (False, "default"), (False, "default")),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernels", GPU_KERNEL_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_gpu_kernel_ops(kernels, dtype):
    """Schema, fake kernel and real kernel agree for every GPU op."""
    forward, backward, fwd_extra, bwd_extra = GPU_KERNEL_OPS[kernels]
    if kernels.startswith("cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"rcl_kernels::{forward}", "CUDA"):
        pytest.skip("rcl_kernels._C was built without its CUDA kernels")
    args = [t.cuda() for t in lse_args(torch.float32)]
    args[0], args[1] = args[0].to(dtype), args[1].to(dtype)
    fwd_args = (*args, 0, 3.0, *fwd_extra)
    torch.library.opcheck(op(forward), fwd_args)
    lse = op(forward)(*fwd_args)
    torch.library.opcheck(op(backward), (torch.rand_like(lse), *args, lse, 0, 3.0, *bwd_extra))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernels", GPU_KERNEL_OPS)
def test_gpu_kernel_ops_refuse_per_anchor_vectors_on_the_host(kernels):
    """The kernels read lse, grad_lse and the tiled weights through raw pointers: one of them on
    the CPU beside CUDA features must raise an error naming it, not reach a kernel."""
    forward, backward, fwd_extra, bwd_extra = GPU_KERNEL_OPS[kernels]
    if kernels.startswith("cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"rcl_kernels::{forward}", "CUDA"):
        pytest.skip("rcl_kernels._C was built without its CUDA kernels")
    args = [t.cuda() for t in lse_args(torch.float32)]
    lse = op(forward)(*args, 0, 3.0, *fwd_extra)
    grad = torch.ones_like(lse)
    for name, bad_grad, bad_lse in (("grad_lse", grad.cpu(), lse), ("lse", grad, lse.cpu())):
        with pytest.raises(RuntimeError, match=rf"\b{name} must"):
            op(backward)(bad_grad, *args, bad_lse, 0, 3.0, *bwd_extra)
    if kernels == "cuda:tiled":
        with pytest.raises(RuntimeError, match="weights must"):
            op("tiled_loss_forward_backward")(grad.cpu(), *args, 0, 3.0, 5)
    torch.cuda.synchronize()


def test_opcheck_tiled_loss_forward_backward():
    for dtype in (torch.float64, torch.float32):
        args = lse_args(dtype)
        weights = torch.rand(args[0].shape[0], dtype=args[4].dtype)
        torch.library.opcheck(op("tiled_loss_forward_backward"), (weights, *args, 0, 3.0, 5))


# The fake kernels run without the device, so the CUDA ops' fakes are checked here too.
FAKE_OPS = {
    **KERNEL_OPS,
    "cuda": ("cuda_lse_forward", "cuda_lse_backward", (False, 2), (False, 2, 2), []),
    "cuda-mma": ("cuda_mma_lse_forward", "cuda_mma_lse_backward", (False, 2), (False, 2), []),
}


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "cuda", "cuda-mma"])
def test_fake_kernels_check_shapes(backend):
    """Under FakeTensorMode the ops run their fake kernels, which must refuse what the real
    kernels refuse (shapes, dtypes) instead of returning outputs of a made-up shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    forward, backward, fwd_extra, bwd_extra, _ = FAKE_OPS[backend]
    z, k, labels, col_labels, row_bias, col_bias = lse_args(torch.float32)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (z, k, labels, col_labels, row_bias, col_bias)]
        lse = op(forward)(*fake, 0, 3.0, *fwd_extra)
        assert lse.shape == (z.shape[0],) and lse.dtype == torch.float32
        dz, dk = op(backward)(lse, *fake, lse, 0, 3.0, *bwd_extra)
        assert dz.shape == z.shape and dk.shape == k.shape
        bad = [  # (argument position, wrong value, words of the message)
            (1, fake[1][:, :-1], "share d"),
            (2, fake[2][:-1], "row_labels"),
            (3, fake[3].int(), "col_labels"),
            (4, fake[4].double(), "row_bias"),
            (5, fake[5][:-1], "col_bias"),
        ]
        for position, value, words in bad:
            args = list(fake)
            args[position] = value
            with pytest.raises(RuntimeError, match=words):
                op(forward)(*args, 0, 3.0, *fwd_extra)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
@pytest.mark.parametrize("prototypes", [True, False])
def test_gradcheck_cpu_float64(prototypes, algorithm, reduction):
    gen = fresh_generator()
    features = random_features((5, 2, 6), gen).requires_grad_()
    centers = random_features((3, 6), gen).requires_grad_()
    labels = draw_labels("uniform", 5, 3, gen)
    bias, margins = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, dtype=torch.float64)

    def loss(f, c):
        return rk.contrastive_loss(f, labels, c if prototypes else None, temperature=0.3,
                                   class_averaging=prototypes, logit_bias=bias, margins=margins,
                                   backend="cpu", algorithm=algorithm, reduction=reduction)

    assert torch.autograd.gradcheck(loss, (features, centers))


def test_torch_func_grad_matches_autograd():
    gen = fresh_generator()
    features = random_features((16, 8), gen)
    centers = random_features((4, 8), gen)
    labels = draw_labels("uniform", 16, 4, gen)
    grad_fn = torch.func.grad(lambda f: rk.bcl_loss(f, labels, centers, backend="cpu"))
    f = features.clone().requires_grad_()
    rk.bcl_loss(f, labels, centers, backend="cpu").backward()
    torch.testing.assert_close(grad_fn(features), f.grad)


@pytest.mark.parametrize("algorithm", ["streaming", "tiled"])
def test_cpu_backend_is_deterministic(algorithm):
    """Bitwise equal run to run. The streaming kernel also across thread counts (every output
    tile has one owner); the tiled one leaves its GEMMs to MKL, whose threads may split a
    reduction, so it repeats exactly at a given thread count."""
    gen = fresh_generator()
    features = random_features((700, 2, 64), gen).float()
    centers = random_features((30, 64), gen).float()
    labels = draw_labels("longtail", 700, 30, gen)
    threads = (1, torch.get_num_threads(), 1) if algorithm == "streaming" else (1, 1, 2, 2)
    runs = []
    for count in threads:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            f, c = features.clone().requires_grad_(), centers.clone().requires_grad_()
            loss = rk.bcl_loss(f, labels, c, backend="cpu", algorithm=algorithm)
            loss.backward()
            runs.append((count, (loss, f.grad, c.grad)))
        finally:
            torch.set_num_threads(previous)
    for count, result in runs[1:]:
        reference = next(r for n, r in runs if n == count or algorithm == "streaming")
        for a, b in zip(reference, result):
            assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 24), views=st.integers(1, 3), dim=st.integers(1, 40),
    num_classes=st.integers(1, 12), draw=st.sampled_from(["uniform", "longtail", "one_class", "few_present"]),
    prototypes=st.booleans(), class_averaging=st.booleans(), with_tables=st.booleans(),
    scale=st.floats(0.5, 20.0), self_check_seed=st.integers(0, 2**31 - 1),
    algorithm=st.sampled_from(["streaming", "tiled"]), reduction=st.sampled_from(["none", "mean"]),
)
def test_property_cpu_equals_reference_float64(batch, views, dim, num_classes, draw, prototypes,
                                               class_averaging, with_tables, scale, self_check_seed,
                                               algorithm, reduction):
    gen = torch.Generator().manual_seed(self_check_seed)
    features = random_features((batch, views, dim), gen, normalize=False)
    centers = random_features((num_classes, dim), gen, normalize=False) if prototypes else None
    labels = draw_labels(draw, batch, num_classes, gen)
    kwargs = dict(temperature=1.0 / scale, class_averaging=class_averaging, num_classes=num_classes,
                  reduction=reduction)
    if with_tables:
        kwargs.update(logit_bias=torch.randn(num_classes, generator=gen, dtype=torch.float64),
                      margins=torch.rand(num_classes, generator=gen, dtype=torch.float64))
    results = []
    for backend in ({"backend": "reference"}, {"backend": "cpu", "algorithm": algorithm}):
        leaves = [features.clone().requires_grad_()] + ([centers.clone().requires_grad_()] if prototypes else [])
        loss = rk.contrastive_loss(leaves[0], labels, leaves[1] if prototypes else None,
                                   **backend, **kwargs)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64)
        grads = torch.autograd.grad((loss * weights).sum(), leaves)
        results.append((loss, *grads))
    for ours, truth in zip(results[1], results[0]):
        torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-9)


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
