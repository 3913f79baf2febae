"""GPU tests of the mma.sync kernels (csrc/cuda/mma_lse_kernels.cu, ops
rcl_kernels::mma_lse_forward / _backward) against a dense float64 formula of the op.

The inputs, the dense formula, the 2x rule (helpers.assert_within_rule, TF32's floor), the
NaN-poisoned allocator and the tests both variants pass are tests/test_cuda_wmma.py's, run here
with the `variant` fixture below; the bad calls' child processes, their set-up and the calls both
ops share are tests/cuda_children.py's (imported, not copied). What differs
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
from test_cuda_wmma import (  # noqa: F401  the shared tests, collected here with MMA
    test_bcl_inaturalist_shape,
    test_empty_row_gives_neg_inf_and_zero_grad,
    test_fp16_tiny_grad_does_not_underflow,
    test_gradcheck_float64,
    test_large_logits_are_stable,
    test_nan_propagates,
    test_no_columns_and_no_rows,
    test_non_contiguous_inputs_and_expanded_grad,
    test_results_are_deterministic,
)


def _mma_kernels_unavailable() -> str | None:
    if base._REASON is not None:  # no GPU, no extension, or one built without CUDA
        return base._REASON
    reason = base.uncompiled_reason("mma_lse_forward", "mma.sync kernels")
    if reason is not None:
        return reason
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


MMA = base.Variant(mma_forward, mma_backward, (1024, 5000, 256))


@pytest.fixture
def variant() -> base.Variant:
    """The variant of the tests shared with test_cuda_wmma.py (imported below)."""
    return MMA


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
    base.run_and_check(base.make_problem(n, m, d, off, self_contrast=self_contrast), mode,
                       SPLITS[splits], variant=MMA)


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
