"""GPU tests of the wmma kernels (csrc/cuda/wmma_lse_kernels.cu, ops
rcl_kernels::wmma_lse_forward / _backward) against a dense float64 formula of the op.

The op (csrc/ops.cpp):
    t_ij  = scale·<z_i, k_j> + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j])
    lse_i = log Σ_{j ≠ i + self_offset} exp(t_ij)            (−inf when no column is left)
    p_ij  = exp(t_ij − lse_i)                                  (0 for the self column / lse = −inf)
    dz    = scale · (g ⊙ P) · K        dk = scale · (g ⊙ P)ᵀ · Z

Tolerance (DESIGN §4): the kernel's relative-norm error against float64 must be at most twice the
error of the same dense formula evaluated in the input dtype (float32 with or without TF32), plus
a small floor. Inputs are fresh every run (the seed is printed; RCL_TEST_SEED=<seed> replays), and
the CUDA caching allocator is filled with NaN before each kernel call so that an output element
the kernels forget to write shows up as NaN.

The split counts are the caller's (rcl_kernels/kernels/planner.py in the library); here they are explicit:
one, several, and more than there are tiles (the kernels clamp them).

Every test is marked `gpu` and skips without a CUDA device or without the CUDA kernels compiled
into rcl_kernels._C. The bad calls of the validation test run in subprocesses, so that a crash
fails that test, naming the signal and the call, instead of killing the suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cuda_children
from helpers import assert_within_rule


def uncompiled_reason(op: str, kernels: str) -> str | None:
    """Why `rcl_kernels::<op>` has no CUDA kernel in the loaded extension, or None."""
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"rcl_kernels::{op}", "CUDA")
    except RuntimeError as error:  # an extension built before the op existed
        return f"rcl_kernels._C has no {op} ({error}); rebuild it with `make install`"
    return None if has_kernel else f"rcl_kernels._C was built without the {kernels}"


def _cuda_kernels_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import rcl_kernels._C  # noqa: F401  (loading the library registers the ops)
    except Exception as error:  # ImportError, or a broken build
        return f"rcl_kernels._C cannot be imported ({type(error).__name__}: {error})"
    return uncompiled_reason("wmma_lse_forward", "CUDA kernels")


_REASON = _cuda_kernels_unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

NEG_INF = float("-inf")
MAX_D = 4096  # rcl_cuda::kMaxFeatureDim

# Kernel modes: (input dtype, allow_tf32).
MODES = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp64": (torch.float64, False),
}
# The accuracy rule is helpers.assert_within_rule with selftest.FLOORS, except in TF32 mode: the
# baseline is cuBLAS's TF32 GEMM, whose rounding and order of products are not the kernels' TF32
# tiles', so the two differ by TF32's unit roundoff (2^-11) rather than by 2x one another's error.
TF32_FLOOR = 2e-4


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _generator() -> torch.Generator:
    seed = int(os.environ.get("RCL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"input seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _longtail_labels(n: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    weights = 0.01 ** (torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1))
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def make_problem(n, m, d, self_offset, *, self_contrast, num_classes=10, scale=10.0, gen=None):
    """Float64 CPU inputs. With self_contrast, k = [z; prototypes] and column j < n is anchor j
    (self_offset 0 then masks the diagonal); otherwise k is independent of z."""
    gen = gen or _generator()
    unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)
    z = unit(n, d)
    row_labels = _longtail_labels(n, num_classes, gen)
    if self_contrast:
        assert m >= n
        protos = unit(m - n, d)
        k = torch.cat([z, protos])
        col_labels = torch.cat([row_labels, torch.arange(m - n) % num_classes])
    else:
        k = unit(m, d)
        col_labels = _longtail_labels(m, num_classes, gen)
    row_bias = 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    col_bias = 0.5 * torch.randn(m, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return dict(z=z, k=k, row_labels=row_labels, col_labels=col_labels, row_bias=row_bias,
                col_bias=col_bias, self_offset=self_offset, scale=scale, g=g)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(prob, dtype):
    """The problem's tensors on the GPU, features in `dtype`, biases and g in its acc dtype."""
    acc = _acc(dtype)
    out = dict(prob)
    for name in ("z", "k"):
        out[name] = prob[name].to("cuda", dtype)
    for name in ("row_labels", "col_labels"):
        out[name] = prob[name].to("cuda")
    for name in ("row_bias", "col_bias", "g"):
        out[name] = prob[name].to("cuda", acc)
    return out


# --------------------------------------------------------------------------------------------------
# The dense formula, every step in one dtype (float64 on the quantized inputs = ground truth)
# --------------------------------------------------------------------------------------------------
def dense_op(p, dtype, allow_tf32=False):
    """lse, dz, dk of the op with every step evaluated in `dtype` on the GPU."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        z, k = p["z"].to(dtype), p["k"].to(dtype)
        n, m = z.shape[0], k.shape[0]
        same = p["col_labels"][None, :] == p["row_labels"][:, None]
        bias = torch.where(same, p["row_bias"][:, None], p["col_bias"][None, :]).to(dtype)
        t = p["scale"] * (z @ k.T) + bias
        rows = torch.arange(n, device=z.device)[:, None]
        cols = torch.arange(m, device=z.device)[None, :]
        masked = cols == rows + p["self_offset"]
        t = t.masked_fill(masked, NEG_INF)
        if m > 0:
            lse = torch.logsumexp(t, dim=1)
        else:
            lse = torch.full((n,), NEG_INF, dtype=dtype, device=z.device)
        live = (~masked) & (lse[:, None] != NEG_INF)
        prob = torch.where(live, torch.exp(t - lse[:, None]), torch.zeros((), dtype=dtype,
                                                                            device=z.device))
        w = p["g"].to(dtype)[:, None] * prob
        dz = p["scale"] * (w @ k)
        dk = p["scale"] * (w.T @ z)
        return lse, dz, dk
    finally:
        torch.set_float32_matmul_precision(old)


def truth(p_dev):
    """Ground truth: float64 on the inputs as the kernel sees them (already rounded to dtype)."""
    return dense_op(p_dev, torch.float64)


# --------------------------------------------------------------------------------------------------
# Calling the kernels
# --------------------------------------------------------------------------------------------------
def poison_allocator():
    """Fill freed blocks of both caching-allocator pools with NaN; the next allocations reuse them."""
    big = torch.full((64 * 2**20,), float("nan"), device="cuda")  # 256 MB, large pool
    small = [torch.full((2**18 - 64,), float("nan"), device="cuda") for _ in range(8)]  # <1 MB
    del big, small


# Split counts asked of the kernels: one, several (a last split shorter than the others), and more
# than any reduction here has tiles (clamped; 2**40 also crosses the int64 schema argument).
SPLITS = {"one": 1, "several": 3, "all": 2**40}


def cuda_forward(p, allow_tf32=False, splits=1):
    poison_allocator()
    return torch.ops.rcl_kernels.wmma_lse_forward(
        p["z"], p["k"], p["row_labels"], p["col_labels"], p["row_bias"], p["col_bias"],
        p["self_offset"], p["scale"], allow_tf32, splits)


def cuda_backward(p, lse, allow_tf32=False, g=None, splits=1):
    poison_allocator()
    return torch.ops.rcl_kernels.wmma_lse_backward(
        p["g"] if g is None else g, p["z"], p["k"], p["row_labels"], p["col_labels"],
        p["row_bias"], p["col_bias"], lse, p["self_offset"], p["scale"], allow_tf32, splits,
        splits)


@dataclass(frozen=True)
class Variant:
    """A CUDA streaming variant's ops as the tests call them, each on a NaN-poisoned allocator:
    forward(p, allow_tf32=False, splits=1) -> lse, backward(p, lse, allow_tf32=False, g=None,
    splits=1) -> (dz, dk). deterministic_case: make_problem's (n, m, d) of the determinism test,
    large enough that every reduction of the variant is split."""
    forward: Callable
    backward: Callable
    deterministic_case: tuple[int, int, int]


WMMA = Variant(cuda_forward, cuda_backward, (256, 3000, 256))


@pytest.fixture
def variant() -> Variant:
    """The variant the shared tests below run; tests/test_cuda_mma.py imports them and gives
    its own."""
    return WMMA


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """‖value − ref‖ / ‖ref‖ in float64 over the entries where ref is finite (absolute when the
    reference is zero). The non-finite pattern must match exactly."""
    value, ref = value.double(), ref.double()
    assert value.shape == ref.shape
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isnan(value), torch.isnan(ref)), "NaN pattern differs"
    assert torch.equal(torch.isposinf(value), torch.isposinf(ref)), "+inf pattern differs"
    assert torch.equal(torch.isneginf(value), torch.isneginf(ref)), "-inf pattern differs"
    if not fin.any():
        return 0.0
    diff = (value[fin] - ref[fin]).norm().item()
    scale = ref[fin].norm().item()
    return diff / (scale if scale > 0 else 1.0)


def check_rule(name, value, low, true, mode):
    """The one accuracy rule for a kernel mode (TF32 with its floor, above)."""
    dtype, tf32 = MODES[mode]
    assert_within_rule(f"{name} [{mode}]", value, low, true, dtype, floor=TF32_FLOOR if tf32 else None)


def run_and_check(prob, mode, splits=1, variant=WMMA):
    dtype, tf32 = MODES[mode]
    p = on_device(prob, dtype)
    lse_t, dz_t, dk_t = truth(p)
    lse_l, dz_l, dk_l = dense_op(p, dtype, allow_tf32=tf32)

    lse = variant.forward(p, tf32, splits=splits)
    assert lse.dtype == _acc(dtype) and lse.shape == (p["z"].shape[0],)
    check_rule("lse", lse, lse_l, lse_t, mode)

    dz, dk = variant.backward(p, lse, tf32, splits=splits)
    assert dz.dtype == _acc(dtype) and dz.shape == p["z"].shape
    assert dk.dtype == _acc(dtype) and dk.shape == p["k"].shape
    check_rule("dz", dz, dz_l, dz_t, mode)
    check_rule("dk", dk, dk_l, dk_t, mode)
    return p, lse, dz, dk


# (n, m, d, self_offset, self_contrast)
CASES = {
    "n1-empty-row": (1, 1, 20, 0, True),  # the only column is masked: lse = -inf, zero gradients
    "n3": (3, 5, 20, 0, True),
    "n17-d130": (17, 300, 130, 0, True),
    "n129-self": (129, 139, 128, 0, True),
    "n4096-m17": (4096, 17, 20, 5, False),  # N >> M, column pass split over rows
    "m4096-n17-d1024": (17, 4096, 1024, 100, False),  # M >> N, columns split across blocks
    "n129-d1024-neg-offset": (129, 1000, 1024, -3, False),
    "bcl-imagenet-lt": (512, 512 + 1000, 1024, 0, True),
    "n4096-square": (4096, 4096 + 100, 128, 0, True),
}


@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_formula(case, mode, splits):
    n, m, d, off, self_contrast = CASES[case]
    run_and_check(make_problem(n, m, d, off, self_contrast=self_contrast), mode, SPLITS[splits])


# The tests from here to test_gradcheck_float64 but test_nan_row_only take the variant from the
# fixture: tests/test_cuda_mma.py runs them on the mma.sync ops.
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "tf32", "fp32"])
def test_bcl_inaturalist_shape(mode, variant):
    """BCL on iNaturalist-like shapes: N=512 anchors, M=8654 columns, d=1024 (M >> N)."""
    run_and_check(make_problem(512, 8654, 1024, 0, self_contrast=True, num_classes=8142), mode,
                  variant=variant)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_row_gives_neg_inf_and_zero_grad(mode, variant):
    p, lse, dz, dk = run_and_check(make_problem(1, 1, 20, 0, self_contrast=True), mode,
                                   variant=variant)
    assert lse.item() == NEG_INF
    assert torch.all(dz == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp64"])
def test_no_columns_and_no_rows(mode, variant):
    dtype, tf32 = MODES[mode]
    # M = 0: every lse is -inf and dz is zero (written, not left poisoned).
    p = on_device(make_problem(5, 0, 33, 0, self_contrast=False), dtype)
    lse = variant.forward(p, tf32)
    assert torch.all(lse == NEG_INF)
    dz, dk = variant.backward(p, lse, tf32)
    assert dz.shape == (5, 33) and torch.all(dz == 0) and dk.shape == (0, 33)
    # N = 0: empty lse, dk zero.
    p = on_device(make_problem(0, 7, 33, 0, self_contrast=False), dtype)
    lse = variant.forward(p, tf32)
    assert lse.shape == (0,)
    dz, dk = variant.backward(p, lse, tf32)
    assert dz.shape == (0, 33) and dk.shape == (7, 33) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_propagates(mode, variant):
    """A NaN feature of anchor r makes lse_r and dz_r NaN (and every dk row it touches); the
    other rows stay finite. No hang."""
    dtype, tf32 = MODES[mode]
    prob = make_problem(70, 90, 40, 3, self_contrast=False)
    prob["z"][7, 11] = float("nan")
    prob["col_bias"][20] = float("nan")  # a NaN bias poisons every row that sees column 20
    p = on_device(prob, dtype)
    lse_t, dz_t, dk_t = truth(p)
    lse = variant.forward(p, tf32)
    assert torch.isnan(lse[7])
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_t))
    dz, dk = variant.backward(p, lse, tf32)
    assert torch.equal(torch.isnan(dz), torch.isnan(dz_t))
    assert torch.equal(torch.isnan(dk), torch.isnan(dk_t))


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_row_only(mode):
    """Only anchor 7's row is NaN: every other lse stays finite and correct."""
    dtype, tf32 = MODES[mode]
    prob = make_problem(70, 90, 40, 3, self_contrast=False)
    prob["z"][7, 11] = float("nan")
    p = on_device(prob, dtype)
    lse_t, _, _ = truth(p)
    lse = cuda_forward(p, tf32)
    assert torch.isnan(lse[7]) and torch.isfinite(torch.cat([lse[:7], lse[8:]])).all()
    assert rel_err(lse, lse_t) < 1e-2


@pytest.mark.parametrize("mode", ["fp32", "fp64", "bf16"])
def test_large_logits_are_stable(mode, variant):
    """scale = 1000: exp of an unshifted logit would overflow; the LSE must stay exact."""
    prob = make_problem(65, 200, 64, 0, self_contrast=True, scale=1000.0)
    run_and_check(prob, mode, variant=variant)


def test_fp16_tiny_grad_does_not_underflow(variant):
    """g ~ 1e-3 (a mean over many anchors): g·p (~1e-6) would fall into float16's subnormals
    without the max|g| normalization of dk's operand."""
    prob = make_problem(300, 400, 64, 0, self_contrast=True)
    prob["g"] = prob["g"] * 1e-3
    p = on_device(prob, torch.float16)
    _, dz_t, dk_t = truth(p)
    lse = variant.forward(p)
    dz, dk = variant.backward(p, lse)
    assert rel_err(dz.double(), dz_t) < 1e-2
    assert rel_err(dk.double(), dk_t) < 1e-2


@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("mode", ["bf16", "fp32", "tf32"])
def test_results_are_deterministic(mode, splits, variant):
    """Every split reduction (the forward's merge, dz and dk) is added in a fixed order: the same
    call gives the same bits."""
    dtype, tf32 = MODES[mode]
    s = SPLITS[splits]
    n, m, d = variant.deterministic_case
    p = on_device(make_problem(n, m, d, 0, self_contrast=True), dtype)
    lse = variant.forward(p, tf32, splits=s)
    assert torch.equal(lse, variant.forward(p, tf32, splits=s))
    a = variant.backward(p, lse, tf32, splits=s)
    b = variant.backward(p, lse, tf32, splits=s)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_contiguous_inputs_and_expanded_grad(variant):
    prob = make_problem(40, 60, 48, 0, self_contrast=True)
    p = on_device(prob, torch.float32)
    lse_t, _, _ = truth(p)
    q = dict(p)
    wide = torch.zeros(40, 96, dtype=p["z"].dtype, device="cuda")
    wide[:, ::2] = p["z"]
    q["z"] = wide[:, ::2]  # stride 2 along d, same values
    q["k"] = p["k"].T.contiguous().T  # column-major
    lse = variant.forward(q)
    assert rel_err(lse, lse_t) < 1e-5
    g = torch.ones((), device="cuda").expand(40)  # what autograd hands for lse.sum()
    dz, dk = variant.backward(q, lse, g=g)
    q1 = dict(p, g=torch.ones(40, dtype=torch.float64, device="cuda"))
    _, dz1, dk1 = truth(q1)
    assert rel_err(dz, dz1) < 1e-5 and rel_err(dk, dk1) < 1e-5


def test_gradcheck_float64(variant):
    """Finite differences of the forward op against the backward op."""
    prob = on_device(make_problem(6, 9, 5, 0, self_contrast=True, scale=2.0), torch.float64)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, k):
            lse = variant.forward(dict(prob, z=z, k=k))
            ctx.save_for_backward(z, k, lse)
            return lse

        @staticmethod
        def backward(ctx, g):
            z, k, lse = ctx.saved_tensors
            return variant.backward(dict(prob, z=z, k=k), lse, g=g)

    z = prob["z"].clone().requires_grad_()
    k = torch.randn(9, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(Op.apply, (z, k))


# --------------------------------------------------------------------------------------------------
# Bad calls, each in a subprocess
# --------------------------------------------------------------------------------------------------
# The wmma ops' bad calls, each in a child process (tests/cuda_children.py: the runner, the set-up
# and the calls every binding shares). The d limit is this binding's own.
_BAD_CALLS_CHILD = cuda_children.child_script(r"""
    def fwd(z=z, k=k, rl=rl, cl=cl, rb=rb, cb=cb, splits=1):
        return ops.wmma_lse_forward(z, k, rl, cl, rb, cb, 0, 1.0, False, splits)

    def bwd(z=z, k=k, lse=lse, row_splits=1, col_splits=1):
        n = z.shape[0]
        return ops.wmma_lse_backward(g[:n], z, k, rl[:n], cl, rb[:n], cb, lse, 0, 1.0, False,
                                     row_splits, col_splits)

    def bcl_loss_d5000():
        f = torch.nn.functional.normalize(randn(8, 2, 5000), dim=-1)
        c = torch.nn.functional.normalize(randn(3, 5000), dim=-1)
        return rk.bcl_loss(f, torch.arange(8, device=dev) % 3, c, backend="cuda")

    calls.update({
        "d_over_max": lambda: fwd(z=randn(4, 4097), k=randn(6, 4097)),
        "backward_d_over_max": lambda: bwd(z=randn(4, 5000), k=randn(6, 5000)),
        "bcl_loss_d5000": bcl_loss_d5000,
        "col_splits_zero": lambda: fwd(splits=0),
        "row_pass_splits_zero": lambda: bwd(row_splits=0),
        "col_pass_splits_negative": lambda: bwd(col_splits=-3),
        "valid_call_after_errors": lambda: bwd(lse=fwd(splits=2**40), row_splits=3, col_splits=3),
    })
""")

# call -> regex its error must match (None: must succeed), run in this order.
BAD_CALLS = {
    **cuda_children.CONTROL_ERRORS,
    "d_over_max": f"d=4097 exceeds the supported maximum of {MAX_D}",
    "backward_d_over_max": f"d=5000 exceeds the supported maximum of {MAX_D}",
    "bcl_loss_d5000": f"d=5000.*{MAX_D}|{MAX_D}.*d=5000",  # refused by the backend or the op
    **cuda_children.ARGUMENT_ERRORS,
    "col_splits_zero": "col_splits must be >= 1",
    "row_pass_splits_zero": "row_pass_splits must be >= 1",
    "col_pass_splits_negative": "col_pass_splits must be >= 1",
    "valid_call_after_errors": None,
}


def test_input_validation_messages():
    cuda_children.check_calls(_BAD_CALLS_CHILD, BAD_CALLS)
