"""GPU tests of the CUDA LSE kernels (csrc/cuda, ops rcl_kernels::cuda_lse_forward/_backward)
against a dense float64 formula of the op.

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

The split counts are the caller's (rcl_kernels/planner.py in the library); here they are explicit:
one, several, and more than there are tiles (the kernels clamp them).

Every test is marked `gpu` and skips without a CUDA device or without the CUDA kernels compiled
into rcl_kernels._C. The bad calls of the validation test run in subprocesses, so that a crash
fails that test, naming the signal and the call, instead of killing the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch


def _cuda_kernels_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import rcl_kernels._C  # noqa: F401  (loading the library registers the ops)
    except Exception as error:  # ImportError, or a broken build
        return f"rcl_kernels._C cannot be imported ({type(error).__name__}: {error})"
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
            "rcl_kernels::cuda_lse_forward", "CUDA")
    except RuntimeError as error:  # an extension built before the op existed
        return f"rcl_kernels._C has no cuda_lse_forward ({error}); rebuild it with `make install`"
    if not has_kernel:
        return "rcl_kernels._C was built without the CUDA kernels"
    return None


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
# Floors of the 2x rule, in relative-norm units (outputs are rounded to the input dtype; fp32 adds
# summation-order and exp2-approximation differences).
FLOOR = {"fp32": 1e-5, "tf32": 2e-4, "bf16": 2.0**-8, "fp16": 2.0**-10, "fp64": 1e-10}


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
    return torch.ops.rcl_kernels.cuda_lse_forward(
        p["z"], p["k"], p["row_labels"], p["col_labels"], p["row_bias"], p["col_bias"],
        p["self_offset"], p["scale"], allow_tf32, splits)


def cuda_backward(p, lse, allow_tf32=False, g=None, splits=1):
    poison_allocator()
    return torch.ops.rcl_kernels.cuda_lse_backward(
        p["g"] if g is None else g, p["z"], p["k"], p["row_labels"], p["col_labels"],
        p["row_bias"], p["col_bias"], lse, p["self_offset"], p["scale"], allow_tf32, splits,
        splits)


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
    err = rel_err(value, true)
    allowed = 2 * rel_err(low, true) + FLOOR[mode]
    assert err <= allowed, f"{name} [{mode}]: relative error {err:.3e} > allowed {allowed:.3e}"


def run_and_check(prob, mode, splits=1):
    dtype, tf32 = MODES[mode]
    p = on_device(prob, dtype)
    lse_t, dz_t, dk_t = truth(p)
    lse_l, dz_l, dk_l = dense_op(p, dtype, allow_tf32=tf32)

    lse = cuda_forward(p, tf32, splits=splits)
    assert lse.dtype == _acc(dtype) and lse.shape == (p["z"].shape[0],)
    check_rule("lse", lse, lse_l, lse_t, mode)

    dz, dk = cuda_backward(p, lse, tf32, splits=splits)
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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "tf32", "fp32"])
def test_bcl_inaturalist_shape(mode):
    """BCL on iNaturalist-like shapes: N=512 anchors, M=8654 columns, d=1024 (M >> N)."""
    run_and_check(make_problem(512, 8654, 1024, 0, self_contrast=True, num_classes=8142), mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_row_gives_neg_inf_and_zero_grad(mode):
    dtype, tf32 = MODES[mode]
    p, lse, dz, dk = run_and_check(make_problem(1, 1, 20, 0, self_contrast=True), mode)
    assert lse.item() == NEG_INF
    assert torch.all(dz == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp64"])
def test_no_columns_and_no_rows(mode):
    dtype, tf32 = MODES[mode]
    # M = 0: every lse is -inf and dz is zero (written, not left poisoned).
    p = on_device(make_problem(5, 0, 33, 0, self_contrast=False), dtype)
    lse = cuda_forward(p, tf32)
    assert torch.all(lse == NEG_INF)
    dz, dk = cuda_backward(p, lse, tf32)
    assert dz.shape == (5, 33) and torch.all(dz == 0) and dk.shape == (0, 33)
    # N = 0: empty lse, dk zero.
    p = on_device(make_problem(0, 7, 33, 0, self_contrast=False), dtype)
    lse = cuda_forward(p, tf32)
    assert lse.shape == (0,)
    dz, dk = cuda_backward(p, lse, tf32)
    assert dz.shape == (0, 33) and dk.shape == (7, 33) and torch.all(dk == 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_propagates(mode):
    """A NaN feature of anchor r makes lse_r and dz_r NaN (and every dk row it touches); the
    other rows stay finite and correct. No hang."""
    dtype, tf32 = MODES[mode]
    prob = make_problem(70, 90, 40, 3, self_contrast=False)
    prob["z"][7, 11] = float("nan")
    prob["col_bias"][20] = float("nan")  # a NaN bias poisons every row that sees column 20
    p = on_device(prob, dtype)
    lse_t, dz_t, dk_t = truth(p)
    lse = cuda_forward(p, tf32)
    assert torch.isnan(lse[7])
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_t))
    dz, dk = cuda_backward(p, lse, tf32)
    assert torch.equal(torch.isnan(dz), torch.isnan(dz_t))
    assert torch.equal(torch.isnan(dk), torch.isnan(dk_t))


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_row_only(mode):
    dtype, tf32 = MODES[mode]
    prob = make_problem(70, 90, 40, 3, self_contrast=False)
    prob["z"][7, 11] = float("nan")
    p = on_device(prob, dtype)
    lse_t, _, _ = truth(p)
    lse = cuda_forward(p, tf32)
    assert torch.isnan(lse[7]) and torch.isfinite(torch.cat([lse[:7], lse[8:]])).all()
    assert rel_err(lse, lse_t) < 1e-2


@pytest.mark.parametrize("mode", ["fp32", "fp64", "bf16"])
def test_large_logits_are_stable(mode):
    """scale = 1000: exp of an unshifted logit would overflow; the LSE must stay exact."""
    prob = make_problem(65, 200, 64, 0, self_contrast=True, scale=1000.0)
    run_and_check(prob, mode)


def test_fp16_tiny_grad_does_not_underflow():
    """g ~ 1e-3 (a mean over many anchors): g·p (~1e-6) would fall into float16's subnormals
    without the max|g| normalization of the column pass."""
    prob = make_problem(300, 400, 64, 0, self_contrast=True)
    prob["g"] = prob["g"] * 1e-3
    p = on_device(prob, torch.float16)
    _, dz_t, dk_t = truth(p)
    lse = cuda_forward(p)
    dz, dk = cuda_backward(p, lse)
    assert rel_err(dz.double(), dz_t) < 1e-2
    assert rel_err(dk.double(), dk_t) < 1e-2


@pytest.mark.parametrize("splits", list(SPLITS))
@pytest.mark.parametrize("mode", ["bf16", "fp32", "tf32"])
def test_backward_is_deterministic(mode, splits):
    dtype, tf32 = MODES[mode]
    s = SPLITS[splits]
    p = on_device(make_problem(256, 3000, 256, 0, self_contrast=True), dtype)
    lse = cuda_forward(p, tf32, splits=s)
    assert torch.equal(lse, cuda_forward(p, tf32, splits=s))
    a = cuda_backward(p, lse, tf32, splits=s)
    b = cuda_backward(p, lse, tf32, splits=s)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_contiguous_inputs_and_expanded_grad():
    prob = make_problem(40, 60, 48, 0, self_contrast=True)
    p = on_device(prob, torch.float32)
    lse_t, dz_t, dk_t = truth(p)
    q = dict(p)
    wide = torch.zeros(40, 96, dtype=p["z"].dtype, device="cuda")
    wide[:, ::2] = p["z"]
    q["z"] = wide[:, ::2]  # stride 2 along d, same values
    q["k"] = p["k"].T.contiguous().T  # column-major
    lse = cuda_forward(q)
    assert rel_err(lse, lse_t) < 1e-5
    g = torch.ones((), device="cuda").expand(40)  # what autograd hands for lse.sum()
    dz, dk = cuda_backward(q, lse, g=g)
    q1 = dict(p, g=torch.ones(40, dtype=torch.float64, device="cuda"))
    _, dz1, dk1 = truth(q1)
    assert rel_err(dz, dz1) < 1e-5 and rel_err(dk, dk1) < 1e-5


def test_gradcheck_float64():
    """Finite differences of the forward op against the backward op."""
    prob = on_device(make_problem(6, 9, 5, 0, self_contrast=True, scale=2.0), torch.float64)
    rl, cl, rb, cb = prob["row_labels"], prob["col_labels"], prob["row_bias"], prob["col_bias"]

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, k):
            lse = torch.ops.rcl_kernels.cuda_lse_forward(z, k, rl, cl, rb, cb, 0, 2.0, False, 1)
            ctx.save_for_backward(z, k, lse)
            return lse

        @staticmethod
        def backward(ctx, g):
            z, k, lse = ctx.saved_tensors
            return torch.ops.rcl_kernels.cuda_lse_backward(
                g, z, k, rl, cl, rb, cb, lse, 0, 2.0, False, 1, 1)

    z = prob["z"].clone().requires_grad_()
    k = torch.randn(9, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(Op.apply, (z, k))


# --------------------------------------------------------------------------------------------------
# Bad calls, each in a subprocess
# --------------------------------------------------------------------------------------------------
# Issue 9: on the first H100 run the d > MAX_D call killed the pytest process. The child runs the
# calls in order and prints a JSON line per call; if it dies, the parent records the call and the
# signal and starts a new child for the calls after it, so every call gets a verdict.
_BAD_CALLS_CHILD = textwrap.dedent(r"""
    import json, sys
    import torch
    import rcl_kernels as rk
    import rcl_kernels._C  # noqa: F401

    ops = torch.ops.rcl_kernels
    dev = "cuda"
    randn = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    z, k = randn(4, 8), randn(6, 8)
    rl = torch.zeros(4, dtype=torch.long, device=dev)
    cl = torch.zeros(6, dtype=torch.long, device=dev)
    rb, cb = torch.zeros(4, device=dev), torch.zeros(6, device=dev)
    lse, g = torch.zeros(4, device=dev), torch.ones(4, device=dev)

    def fwd(z=z, k=k, rl=rl, cl=cl, rb=rb, cb=cb, splits=1):
        return ops.cuda_lse_forward(z, k, rl, cl, rb, cb, 0, 1.0, False, splits)

    def bwd(z=z, k=k, lse=lse, row_splits=1, col_splits=1):
        n = z.shape[0]
        return ops.cuda_lse_backward(g[:n], z, k, rl[:n], cl, rb[:n], cb, lse, 0, 1.0, False,
                                     row_splits, col_splits)

    def bcl_loss_d5000():
        f = torch.nn.functional.normalize(randn(8, 2, 5000), dim=-1)
        c = torch.nn.functional.normalize(randn(3, 5000), dim=-1)
        return rk.bcl_loss(f, torch.arange(8, device=dev) % 3, c, backend="cuda")

    def cpu_op_error():
        return ops.cpu_lse_forward(z.cpu(), torch.randn(6, 9), rl.cpu(), cl.cpu(), rb.cpu(),
                                   cb.cpu(), 0, 1.0)

    calls = {
        # Controls: a C++ error from ATen's CUDA code, and one from this extension's CPU kernel,
        # after CUDA is initialized. If these die too, the process cannot survive any C++ throw.
        "control_aten_cuda_error": lambda: torch.mm(randn(2, 3), randn(4, 5)),
        "control_cpu_op_error": cpu_op_error,
        "d_over_max": lambda: fwd(z=randn(4, 4097), k=randn(6, 4097)),
        "backward_d_over_max": lambda: bwd(z=randn(4, 5000), k=randn(6, 5000)),
        "bcl_loss_d5000": bcl_loss_d5000,
        "z_on_cpu": lambda: fwd(z=z.cpu()),
        "k_dtype": lambda: fwd(k=k.double()),
        "k_feature_dim": lambda: fwd(k=randn(6, 9)),
        "row_labels_device": lambda: fwd(rl=rl.cpu()),
        "col_labels_shape": lambda: fwd(cl=cl[:-1]),
        "row_bias_dtype": lambda: fwd(rb=rb.double()),
        "z_dtype": lambda: fwd(z=z.int(), k=k.int()),
        "col_splits_zero": lambda: fwd(splits=0),
        "row_pass_splits_zero": lambda: bwd(row_splits=0),
        "col_pass_splits_negative": lambda: bwd(col_splits=-3),
        "lse_dtype": lambda: bwd(lse=lse.double()),
        "valid_call_after_errors": lambda: bwd(lse=fwd(splits=2**40), row_splits=3, col_splits=3),
    }
    for name in sys.argv[1:]:
        print(json.dumps({"begin": name}), flush=True)
        try:
            calls[name]()
            torch.cuda.synchronize()
            error = None
        except Exception as e:  # noqa: BLE001  (the verdict is the message)
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"call": name, "error": error}), flush=True)
""")

# call -> regex its error must match (None: must succeed).
BAD_CALLS = {
    "control_aten_cuda_error": "cannot be multiplied",
    "control_cpu_op_error": "must share d",
    "d_over_max": f"d=4097 exceeds the supported maximum of {MAX_D}",
    "backward_d_over_max": f"d=5000 exceeds the supported maximum of {MAX_D}",
    "bcl_loss_d5000": f"d=5000.*{MAX_D}|{MAX_D}.*d=5000",  # refused by the backend or the op
    "z_on_cpu": "z must be a CUDA tensor",
    "k_dtype": "k must have z's dtype",
    "k_feature_dim": "k must have z's feature dim",
    "row_labels_device": "row_labels must be on z's device",
    "col_labels_shape": "col_labels must have shape",
    "row_bias_dtype": "row_bias must be",
    "z_dtype": "z must be float32, float64, bfloat16 or float16",
    "col_splits_zero": "col_splits must be >= 1",
    "row_pass_splits_zero": "row_pass_splits must be >= 1",
    "col_pass_splits_negative": "col_pass_splits must be >= 1",
    "lse_dtype": "lse must be",
    "valid_call_after_errors": None,
}


def run_calls_in_subprocesses(names, timeout=300):
    """{call: ("error", message or None) | ("killed", signal name and stderr tail)}."""
    verdicts, pending = {}, list(names)
    while pending:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", _BAD_CALLS_CHILD, *pending],
            capture_output=True, text=True, timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "begin" in record:
                started = record["begin"]
            else:
                verdicts[record["call"]] = ("error", record["error"])
                started = None
        if proc.returncode == 0:
            break
        what = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit status {proc.returncode}")
        if started is None:  # died outside any call (setup or shutdown): nothing more to learn
            raise AssertionError(f"bad-call child {what} outside a call:\n{proc.stderr[-3000:]}")
        verdicts[started] = ("killed", f"{what}\n{proc.stderr[-3000:]}{native_backtrace(started)}")
        pending = pending[pending.index(started) + 1:]
    return verdicts


def native_backtrace(call, timeout=300):
    """The C++ backtrace of `call` dying alone under gdb (when gdb is installed), for the report."""
    if shutil.which("gdb") is None:
        return "\n(no gdb for a native backtrace)"
    proc = subprocess.run(
        ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c",
         _BAD_CALLS_CHILD, call], capture_output=True, text=True, timeout=timeout)
    out = proc.stdout
    return "\ngdb:\n" + out[max(0, out.find("received signal")):][:6000]  # innermost frames first


def test_input_validation_messages():
    verdicts = run_calls_in_subprocesses(list(BAD_CALLS))
    failures = []
    for name, pattern in BAD_CALLS.items():
        kind, detail = verdicts[name]
        if kind == "killed":
            failures.append(f"{name}: the process was {detail}")
        elif pattern is None and detail is not None:
            failures.append(f"{name}: expected success, got {detail}")
        elif pattern is not None and (detail is None or not re.search(pattern, detail)):
            failures.append(f"{name}: expected an error matching {pattern!r}, got {detail}")
    assert not failures, "\n".join(failures)
