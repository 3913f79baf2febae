"""GPU tests of the mma.sync kernels (csrc/cuda/mma_lse_kernels.cu, ops
rcl_kernels::mma_lse_forward / _backward) against a dense float64 formula of the op.

The inputs, the dense formula, the 2x rule (helpers.assert_within_rule, TF32's floor) and the
NaN-poisoned allocator are tests/test_cuda_wmma.py's; the bad calls' child processes, their
set-up and the calls both ops share are tests/cuda_children.py's (imported, not copied). What differs
from the wmma ops: float32 without allow_tf32 runs 3xTF32 products (held to the float32 rule),
the backward takes one split count (the rows of each column tile), and there is no limit on d
(5000, 8192 and 20000 included). The bad calls run in subprocesses, so a crash fails that test
with the signal instead of killing the suite.

Every test is marked `gpu` and skips without a CUDA device of compute capability 8.0 or newer, or
without the ops compiled into rcl_kernels._C.
"""

from __future__ import annotations

import pytest
import torch

import cuda_children
import test_cuda_wmma as base


def _mma_kernels_unavailable() -> str | None:
    if base._REASON is not None:  # no GPU, no extension, or one built without CUDA
        return base._REASON
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
            "rcl_kernels::mma_lse_forward", "CUDA")
    except RuntimeError as error:  # an extension built before the op existed
        return f"rcl_kernels._C has no mma_lse_forward ({error}); rebuild it with `make install`"
    if not has_kernel:
        return "rcl_kernels._C was built without the mma.sync kernels"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the mma.sync kernels need compute capability 8.0 or newer"
    return None


_REASON = _mma_kernels_unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

MODES = base.MODES  # "fp32" is 3xTF32 here
SPLITS = base.SPLITS


def mma_forward(p, allow_tf32=False, splits=1):
    base.poison_allocator()
    return torch.ops.rcl_kernels.mma_lse_forward(
        p["z"], p["k"], p["row_labels"], p["col_labels"], p["row_bias"], p["col_bias"],
        p["self_offset"], p["scale"], allow_tf32, splits)


def mma_backward(p, lse, allow_tf32=False, g=None, splits=1):
    base.poison_allocator()
    return torch.ops.rcl_kernels.mma_lse_backward(
        p["g"] if g is None else g, p["z"], p["k"], p["row_labels"], p["col_labels"],
        p["row_bias"], p["col_bias"], lse, p["self_offset"], p["scale"], allow_tf32, splits)


def run_and_check(prob, mode, splits=1):
    dtype, tf32 = MODES[mode]
    p = base.on_device(prob, dtype)
    lse_t, dz_t, dk_t = base.truth(p)
    lse_l, dz_l, dk_l = base.dense_op(p, dtype, allow_tf32=tf32)

    lse = mma_forward(p, tf32, splits=splits)
    assert lse.dtype == base._acc(dtype) and lse.shape == (p["z"].shape[0],)
    base.check_rule("lse", lse, lse_l, lse_t, mode)

    dz, dk = mma_backward(p, lse, tf32, splits=splits)
    assert dz.dtype == base._acc(dtype) and dz.shape == p["z"].shape
    assert dk.dtype == base._acc(dtype) and dk.shape == p["k"].shape
    base.check_rule("dz", dz, dz_l, dz_t, mode)
    base.check_rule("dk", dk, dk_l, dk_t, mode)
    return p, lse, dz, dk


# (n, m, d, self_offset, self_contrast): test_cuda_wmma's cases, and d past any chunk count.
CASES = {
    **base.CASES,
    "d5000": (70, 300, 5000, 0, True),
    "d8192-offset": (33, 200, 8192, 3, False),
    "d130-many-column-tiles": (300, 3000, 130, 0, True),  # ordered dz additions under load
}


@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_formula(case, mode, splits):
    n, m, d, off, self_contrast = CASES[case]
    run_and_check(base.make_problem(n, m, d, off, self_contrast=self_contrast), mode, SPLITS[splits])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "tf32", "fp32"])
def test_bcl_inaturalist_shape(mode):
    """BCL on iNaturalist-like shapes: N=512 anchors, M=8654 columns, d=1024 (M >> N)."""
    run_and_check(base.make_problem(512, 8654, 1024, 0, self_contrast=True, num_classes=8142), mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_row_gives_neg_inf_and_zero_grad(mode):
    p, lse, dz, dk = run_and_check(base.make_problem(1, 1, 20, 0, self_contrast=True), mode)
    assert lse.item() == base.NEG_INF
    assert torch.all(dz == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp64"])
def test_no_columns_and_no_rows(mode):
    dtype, tf32 = MODES[mode]
    p = base.on_device(base.make_problem(5, 0, 33, 0, self_contrast=False), dtype)
    lse = mma_forward(p, tf32)
    assert torch.all(lse == base.NEG_INF)
    dz, dk = mma_backward(p, lse, tf32)
    assert dz.shape == (5, 33) and torch.all(dz == 0) and dk.shape == (0, 33)
    p = base.on_device(base.make_problem(0, 7, 33, 0, self_contrast=False), dtype)
    lse = mma_forward(p, tf32)
    assert lse.shape == (0,)
    dz, dk = mma_backward(p, lse, tf32)
    assert dz.shape == (0, 33) and dk.shape == (7, 33) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_propagates(mode):
    """A NaN feature of anchor r makes lse_r and dz_r NaN (and every dk row it touches); the
    other rows stay finite. No hang."""
    dtype, tf32 = MODES[mode]
    prob = base.make_problem(70, 90, 40, 3, self_contrast=False)
    prob["z"][7, 11] = float("nan")
    prob["col_bias"][20] = float("nan")  # a NaN bias poisons every row that sees column 20
    p = base.on_device(prob, dtype)
    lse_t, dz_t, dk_t = base.truth(p)
    lse = mma_forward(p, tf32)
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_t))
    dz, dk = mma_backward(p, lse, tf32)
    assert torch.equal(torch.isnan(dz), torch.isnan(dz_t))
    assert torch.equal(torch.isnan(dk), torch.isnan(dk_t))


@pytest.mark.parametrize("mode", ["fp32", "fp64", "bf16"])
def test_large_logits_are_stable(mode):
    """scale = 1000: exp of an unshifted logit would overflow; the LSE must stay exact."""
    run_and_check(base.make_problem(65, 200, 64, 0, self_contrast=True, scale=1000.0), mode)


def test_fp16_tiny_grad_does_not_underflow():
    """g ~ 1e-3: g·p (~1e-6) would fall into float16's subnormals without the max|g|
    normalization of dk's operand."""
    prob = base.make_problem(300, 400, 64, 0, self_contrast=True)
    prob["g"] = prob["g"] * 1e-3
    p = base.on_device(prob, torch.float16)
    _, dz_t, dk_t = base.truth(p)
    lse = mma_forward(p)
    dz, dk = mma_backward(p, lse)
    assert base.rel_err(dz.double(), dz_t) < 1e-2
    assert base.rel_err(dk.double(), dk_t) < 1e-2


@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("mode", ["bf16", "fp32", "tf32"])
def test_results_are_deterministic(mode, splits):
    """dz (column tiles in order), dk (splits in order) and the split merge of the forward are
    added in a fixed order: the same call gives the same bits."""
    dtype, tf32 = MODES[mode]
    s = SPLITS[splits]
    p = base.on_device(base.make_problem(1024, 5000, 256, 0, self_contrast=True), dtype)
    lse = mma_forward(p, tf32, splits=s)
    assert torch.equal(lse, mma_forward(p, tf32, splits=s))
    a = mma_backward(p, lse, tf32, splits=s)
    b = mma_backward(p, lse, tf32, splits=s)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_contiguous_inputs_and_expanded_grad():
    prob = base.make_problem(40, 60, 48, 0, self_contrast=True)
    p = base.on_device(prob, torch.float32)
    lse_t, _, _ = base.truth(p)
    q = dict(p)
    wide = torch.zeros(40, 96, dtype=p["z"].dtype, device="cuda")
    wide[:, ::2] = p["z"]
    q["z"] = wide[:, ::2]  # stride 2 along d, same values
    q["k"] = p["k"].T.contiguous().T  # column-major
    lse = mma_forward(q)
    assert base.rel_err(lse, lse_t) < 1e-5
    g = torch.ones((), device="cuda").expand(40)  # what autograd hands for lse.sum()
    dz, dk = mma_backward(q, lse, g=g)
    q1 = dict(p, g=torch.ones(40, dtype=torch.float64, device="cuda"))
    _, dz1, dk1 = base.truth(q1)
    assert base.rel_err(dz, dz1) < 1e-5 and base.rel_err(dk, dk1) < 1e-5


def test_gradcheck_float64():
    """Finite differences of the forward op against the backward op."""
    prob = base.on_device(base.make_problem(6, 9, 5, 0, self_contrast=True, scale=2.0),
                          torch.float64)
    rl, cl, rb, cb = prob["row_labels"], prob["col_labels"], prob["row_bias"], prob["col_bias"]

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, k):
            lse = torch.ops.rcl_kernels.mma_lse_forward(z, k, rl, cl, rb, cb, 0, 2.0, False, 1)
            ctx.save_for_backward(z, k, lse)
            return lse

        @staticmethod
        def backward(ctx, g):
            z, k, lse = ctx.saved_tensors
            return torch.ops.rcl_kernels.mma_lse_backward(
                g, z, k, rl, cl, rb, cb, lse, 0, 2.0, False, 1)

    z = prob["z"].clone().requires_grad_()
    k = torch.randn(9, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(Op.apply, (z, k))


# --------------------------------------------------------------------------------------------------
# Bad calls (and calls with a large d), each in a child process: tests/cuda_children.py's runner,
# set-up and shared calls, with these ops' fwd, bwd and own calls.
# --------------------------------------------------------------------------------------------------
_MMA_CALLS_CHILD = cuda_children.child_script(r"""
    def fwd(z=z, k=k, rl=rl, cl=cl, rb=rb, cb=cb, splits=1):
        return ops.mma_lse_forward(z, k, rl, cl, rb, cb, 0, 1.0, False, splits)

    def bwd(z=z, k=k, lse=lse, g=g, splits=1):
        n = z.shape[0]
        return ops.mma_lse_backward(g, z, k, rl[:n], cl, rb[:n], cb, lse, 0, 1.0, False,
                                         splits)

    def large_d(d, dtype):
        zz = torch.nn.functional.normalize(randn(4, d), dim=-1).to(dtype)
        kk = torch.nn.functional.normalize(randn(6, d), dim=-1).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        l = ops.mma_lse_forward(zz, kk, rl, cl, rb.to(acc), cb.to(acc), 0, 10.0, False, 1)
        dz, dk = ops.mma_lse_backward(g.to(acc), zz, kk, rl, cl, rb.to(acc), cb.to(acc), l,
                                           0, 10.0, False, 3)
        assert all(torch.isfinite(t).all() for t in (l, dz, dk)), "non-finite result"

    calls.update({
        "d5000_bf16": lambda: large_d(5000, torch.bfloat16),
        "d8192_fp32": lambda: large_d(8192, torch.float32),
        "d20000_fp16": lambda: large_d(20000, torch.float16),
        "d8192_fp64": lambda: large_d(8192, torch.float64),
        "col_splits_zero": lambda: fwd(splits=0),
        "splits_zero": lambda: bwd(splits=0),
        "splits_negative": lambda: bwd(splits=-3),
        "grad_lse_shape": lambda: bwd(g=g[:3]),
        "valid_call_after_errors": lambda: bwd(lse=fwd(splits=2**40), splits=2**40),
    })
""")

# call -> regex its error must match (None: must succeed), run in this order.
MMA_CALLS = {
    **cuda_children.CONTROL_ERRORS,
    "d5000_bf16": None,
    "d8192_fp32": None,
    "d20000_fp16": None,
    "d8192_fp64": None,
    **cuda_children.ARGUMENT_ERRORS,
    "col_splits_zero": "mma_lse_forward: col_splits must be >= 1",
    "splits_zero": "mma_lse_backward: splits must be >= 1",
    "splits_negative": "mma_lse_backward: splits must be >= 1",
    "grad_lse_shape": "grad_lse must have shape",
    "valid_call_after_errors": None,
}


def test_bad_calls_raise_and_large_d_runs():
    cuda_children.check_calls(_MMA_CALLS_CHILD, MMA_CALLS)
