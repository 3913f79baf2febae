"""Kernel-level tests of rcl_kernels.kernels.triton against a dense float64 formula of the op.

Tolerance (DESIGN §4): the kernel's relative-norm error against float64 must be at most twice the
error of the same dense formula evaluated in the input dtype, plus a small floor. On a machine
without CUDA the kernels run under TRITON_INTERPRET=1 at small sizes; the `gpu` tests run the
large shapes on a CUDA device and skip elsewhere.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before triton (or the module under test) is imported: triton.jit decides at
    # decoration time whether a kernel is interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from helpers import assert_within_rule  # noqa: E402
from rcl_kernels.kernels import planner  # noqa: E402
from rcl_kernels.kernels import triton as backend  # noqa: E402
from rcl_kernels.kernels.triton import configs, jit_helpers, launch  # noqa: E402
from rcl_kernels.kernels.triton.variants import VARIANTS, Variant  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_REASON = backend.unavailable_reason(DEVICE)
if _REASON is not None:
    pytest.skip(f"Triton kernels unavailable on {DEVICE}: {_REASON}", allow_module_level=True)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
NEG_INF = float("-inf")



# --------------------------------------------------------------------------------------------------
# Oracle: the dense formula, in any dtype
# --------------------------------------------------------------------------------------------------
def dense_op(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, g, dtype,
             operand=None):
    """lse, dz, dk of the op, every step evaluated in `dtype` (float64 = ground truth).

    operand: applied to both operands of every product (round_tf32: TF32 products). The
    products then associate as the kernels' do, g applied after P·K and g/max|g| before the
    rounding of g·P, so that a row with a handful of columns (N1-M6) rounds the same operands:
    otherwise two independent roundings of 5 terms can differ by more than 2x."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a strict fp32 baseline, never TF32
    try:
        return _dense_op(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, g,
                         dtype, operand)
    finally:
        torch.set_float32_matmul_precision(precision)


def _dense_op(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, g, dtype,
              operand):
    z, k = z.to(dtype), k.to(dtype)
    n, m = z.shape[0], k.shape[0]
    same = col_labels[None, :] == row_labels[:, None]
    bias = torch.where(same, row_bias[:, None], col_bias[None, :]).to(dtype)
    t = scale * (z @ k.T if operand is None else operand(z) @ operand(k).T) + bias
    self_col = torch.arange(m, device=z.device)[None, :] == (
        torch.arange(n, device=z.device)[:, None] + self_offset)
    t = t.masked_fill(self_col, NEG_INF)
    lse = (torch.logsumexp(t, dim=1) if m > 0
           else torch.full((n,), NEG_INF, dtype=dtype, device=z.device))
    dead = lse == NEG_INF
    p = torch.exp(t - torch.where(dead, torch.inf, lse)[:, None])
    gp = g.to(dtype)[:, None] * p
    if operand is None:
        dz = scale * (gp @ k)
        dk = scale * (gp.T @ z)
    else:
        g = g.to(dtype)
        gmax = g.abs().max().where(g.abs().max() > 0, torch.ones((), dtype=dtype))
        dz = scale * g[:, None] * (operand(p) @ operand(k))
        dk = scale * gmax * (operand(gp / gmax).T @ operand(z))
    return lse, dz, dk


def round_tf32(x):
    """fp32 -> TF32 kept in fp32, rounded to nearest with ties away from zero (cvt.rna.tf32.f32,
    what the kernels apply to fp32 operands of TF32 products), computed in float64 arithmetic
    on the value rather than on the bits: q is the spacing of TF32 numbers at |x| (10 fraction
    bits; subnormal spacing below 2^-126); |x| rounds to the nearer multiple of q, halves away
    from zero; past the largest TF32 it becomes inf. inf and NaN stay as they are."""
    x64 = x.double()
    _, exponent = torch.frexp(x64)  # |x| = m·2^e, m in [0.5, 1)
    q = torch.ldexp(torch.ones_like(x64), (exponent - 1).clamp_min(-126) - 10)
    rounded = torch.floor(x64.abs() / q + 0.5) * q
    out = torch.copysign(rounded, x64).float()  # 2^128 -> inf in the cast
    return torch.where(torch.isfinite(x), out, x.float())


def rel_err(x, ref):
    """Relative L2 error over the finite entries of ref (non-finite pattern checked separately)."""
    fin = torch.isfinite(ref)
    diff = (x.double()[fin] - ref[fin]).norm()
    return (diff / ref[fin].norm().clamp_min(1e-30)).item()


LAST_SEED = None


def assert_close(name, out, ref64, ref_lowp, dtype):
    """The one accuracy rule (helpers.assert_within_rule): same non-finite entries (−inf for rows
    without columns), finite ones within 2x the dense formula's error in `dtype` plus its floor."""
    assert_within_rule(f"{name} (RCL_TEST_SEED={LAST_SEED})", out, ref_lowp, ref64, dtype)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the test."""

    def alloc(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(launch, "_alloc", alloc)


def make_inputs(n, m, d, dtype, *, num_classes=4, self_offset=0, with_prototypes=False,
                singleton=True, gen=None, device=DEVICE):
    """Fresh random inputs; labels from a long-tailed draw with (optionally) one singleton label.

    The seed comes from the OS (torch's default generator starts from a fixed seed), is printed
    in failure messages, and can be pinned with RCL_TEST_SEED to reproduce a failure."""
    global LAST_SEED
    if gen is None:
        LAST_SEED = int(os.environ.get("RCL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
        gen = torch.Generator().manual_seed(LAST_SEED)
    z = torch.randn(n, d, generator=gen)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-6)
    probs = torch.tensor([0.6 ** c for c in range(num_classes)])
    row_labels = torch.multinomial(probs, n, replacement=True, generator=gen)
    if singleton and n > 1:
        row_labels[n // 2] = num_classes  # a label with exactly one member
    if with_prototypes:
        # The loss's layout: K = [Z; P], column labels = [y; 0..C], anchor i is column i.
        protos = torch.randn(m - n, d, generator=gen)
        protos = protos / protos.norm(dim=1, keepdim=True)
        k = torch.cat([z, protos])
        col_labels = torch.cat([row_labels, torch.arange(m - n) % (num_classes + 1)])
    else:
        k = torch.randn(m, d, generator=gen)
        k = k / k.norm(dim=1, keepdim=True).clamp_min(1e-6)
        col_labels = torch.multinomial(probs, m, replacement=True, generator=gen)
    row_bias = 0.5 * torch.randn(n, generator=gen)
    col_bias = 0.5 * torch.randn(m, generator=gen)
    g = torch.randn(n, generator=gen)
    scale = float(torch.empty(()).uniform_(2.0, 14.0, generator=gen))
    to = dict(device=device)
    return dict(z=z.to(dtype).to(**to), k=k.to(dtype).to(**to),
                row_labels=row_labels.to(**to), col_labels=col_labels.to(**to),
                row_bias=row_bias.to(**to), col_bias=col_bias.to(**to),
                self_offset=self_offset, scale=scale), g.to(**to)


def run_kernels(inp, g, allow_tf32, variant="default", **split):
    """Kernels of a variant with optional private overrides: split counts and explicit
    triton.Configs."""
    variant = Variant.of(variant)
    fwd_split = {key: split[key] for key in ("num_splits", "config") if key in split}
    lse = launch.forward(**inp, allow_tf32=allow_tf32, variant=variant, **fwd_split)
    bwd_keys = ("dz_splits", "dk_splits", "dz_config", "dk_config", "one_pass_config")
    bwd_split = {key: split[key] for key in bwd_keys if key in split}
    dz, dk = launch.backward(g, inp["z"], inp["k"], inp["row_labels"], inp["col_labels"],
                         inp["row_bias"], inp["col_bias"], lse, inp["self_offset"], inp["scale"],
                         allow_tf32, variant, **bwd_split)
    return lse, dz, dk


def check_against_oracle(inp, g, dtype, allow_tf32, variant="default", **split):
    lse, dz, dk = run_kernels(inp, g, allow_tf32, variant, **split)
    # lse, dz and dk all come back in the accumulation dtype (csrc/ops.cpp).
    assert lse.dtype == dz.dtype == dk.dtype == torch.float32
    # The oracle runs where the inputs are (float64 on the GPU is fast; the dtype-X baseline is
    # then PyTorch's own GPU math in that dtype).
    ref64 = dense_op(**inp, g=g, dtype=torch.float64)
    if dtype == torch.float32 and allow_tf32:
        # TF32 baseline: the dense formula with TF32 products, operands rounded to nearest
        # (cuBLAS's TF32; the kernels round P and g·P as operands too, which matters when a row
        # has few columns).
        ref_low = dense_op(**inp, g=g, dtype=torch.float32, operand=round_tf32)
    else:
        ref_low = dense_op(**inp, g=g, dtype=dtype)
    for name, out, r64, rlow in zip(("lse", "dz", "dk"), (lse, dz, dk), ref64, ref_low):
        assert_close(name, out, r64, rlow, dtype)
    return lse, dz, dk


# --------------------------------------------------------------------------------------------------
# Small shapes (interpreter on the CPU, or the GPU when there is one)
# --------------------------------------------------------------------------------------------------
# (N, M, d, self_offset, with_prototypes)
SHAPES = [
    pytest.param(1, 1, 20, 0, False, id="N1-M1-no-column-left"),
    pytest.param(1, 6, 130, 0, False, id="N1-M6-d130"),
    pytest.param(3, 150, 20, 0, False, id="N3-M150-MggN"),
    pytest.param(17, 23, 130, 0, True, id="N17-protos-d130"),
    pytest.param(17, 200, 20, 40, False, id="N17-M200-offset40"),
    pytest.param(70, 9, 20, 0, False, id="N70-M9-NggM"),
    pytest.param(17, 17, 33, 5, False, id="N17-M17-offset5-partial-self"),
    pytest.param(32, 64, 64, 16, False, id="N32-M64-d64-full-tiles"),  # EVEN_M/N/D under lean masks
]
# The timed kernels, every forward flag on the streamed Z path, every flag with a resident Z tile,
# wide configs and grouped program order, and the one-pass backward in its two forms.
VARIANT_IDS = ["default", "exp2-lean", "forward-all-grouped", "one-pass", "one-pass-atomic"]
DTYPES = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.float32, True, id="fp32-tf32"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float16, False, id="fp16"),
]


# Every dtype path with the timed kernels; the other variants change no fp16-specific code, so
# the three product precisions (fp32 FMA, TF32, bf16 tensor cores) cover them and keep the
# interpreter run short. The one-pass variants skip fp32 FMA, which runs the two-pass kernels
# (with exp2-lean's flags) there.
DTYPE_VARIANTS = [pytest.param(*dt.values, "default", id=f"{dt.id}-default") for dt in DTYPES] + [
    pytest.param(*dt.values, v, id=f"{dt.id}-{v}")
    for v in VARIANT_IDS[1:] for dt in DTYPES
    if dt.id != "fp16" and not (v.startswith("one-pass") and dt.id == "fp32")
] + [  # fp32 "highest" by 3xTF32: the fp32 rule
    pytest.param(torch.float32, False, "3xtf32", id="fp32-3xtf32")
]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype,allow_tf32,variant", DTYPE_VARIANTS)
@pytest.mark.parametrize("n,m,d,self_offset,protos", SHAPES)
def test_forward_backward_vs_float64(n, m, d, self_offset, protos, dtype, allow_tf32, variant):
    inp, g = make_inputs(n, m, d, dtype, self_offset=self_offset, with_prototypes=protos)
    lse, _, _ = check_against_oracle(inp, g, dtype, allow_tf32, variant)
    if n == 1 and m == 1:
        assert lse.item() == NEG_INF


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", [*VARIANT_IDS, Variant(exp2=True, group_m=2)],
                         ids=[*VARIANT_IDS, "grouped-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_splits(dtype, variant):
    """Column splits (forward + merge, dz) and row splits (dk) against the oracle; three row
    blocks and three splits make a partial group of program order, of 8 and of 2 row blocks."""
    inp, g = make_inputs(40, 90, 40, dtype, self_offset=3)
    check_against_oracle(inp, g, dtype, False, variant, num_splits=3, dz_splits=4, dk_splits=2)
    # More splits than tiles: the split length is rounded up and the count shrinks to match.
    check_against_oracle(inp, g, dtype, False, variant, num_splits=50, dz_splits=50,
                         dk_splits=50)


@pytest.mark.triton_interpret
def test_rows_without_columns_and_dead_bias():
    """−inf biases remove columns: rows with nothing left get lse = −inf and zero gradients."""
    inp, g = make_inputs(9, 12, 20, torch.float32, num_classes=2)
    # Every column is dead through col_bias, so only same-label columns (row_bias) stay live;
    # rows 0..2 carry a label no column has, so nothing is left for them.
    inp["col_bias"] = torch.full_like(inp["col_bias"], NEG_INF)
    inp["row_labels"][:3] = 99
    lse, dz, dk = check_against_oracle(inp, g, torch.float32, False)
    assert torch.all(lse[:3].cpu() == NEG_INF)
    assert torch.all(dz[:3].cpu() == 0)


@pytest.mark.triton_interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("variant", VARIANT_IDS)
@pytest.mark.parametrize("where", ["z", "k"])
def test_nan_propagates(where, variant):
    inp, g = make_inputs(17, 40, 20, torch.float32, self_offset=0)
    bad = 5
    x = inp[where].clone()
    x[bad, 7] = float("nan")
    inp[where] = x
    lse, dz, dk = run_kernels(inp, g, False, variant)
    lse = lse.cpu()
    if where == "z":
        assert torch.isnan(lse[bad])
        assert torch.isfinite(torch.cat([lse[:bad], lse[bad + 1:]])).all()
        assert torch.isnan(dz[bad]).all()
    else:
        # Column 5 is live for every row except row 5 (its self column).
        expect = torch.ones(17, dtype=torch.bool)
        expect[bad] = False
        assert torch.equal(torch.isnan(lse), expect)
    # Split merge must keep NaN too.
    lse_split = launch.forward(**inp, allow_tf32=False, variant=Variant.of(variant),
                           num_splits=3).cpu()
    assert torch.equal(torch.isnan(lse_split), torch.isnan(lse))


@pytest.mark.triton_interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_inf_input_gives_nan():
    inp, g = make_inputs(5, 30, 20, torch.float32)
    inp["z"][2, 3] = float("inf")
    lse, _, _ = run_kernels(inp, g, False)
    assert torch.isnan(lse[2].cpu())


@pytest.mark.triton_interpret
def test_strided_inputs_do_not_read_padding():
    """z and k are views into NaN-padded buffers (non-contiguous, k transposed storage)."""
    inp, g = make_inputs(13, 37, 130, torch.float32, self_offset=2)
    zbuf = torch.full((20, 150), float("nan"), device=DEVICE)
    zbuf[:13, :130] = inp["z"]
    kbuf = torch.full((140, 45), float("nan"), device=DEVICE)  # k stored transposed
    kbuf[:130, :37] = inp["k"].T
    strided = dict(inp, z=zbuf[:13, :130], k=kbuf[:130, :37].T)
    assert not strided["z"].is_contiguous() and not strided["k"].is_contiguous()
    lse, dz, dk = check_against_oracle(strided, g, torch.float32, False)
    lse2, dz2, dk2 = run_kernels(inp, g, False)
    torch.testing.assert_close(lse, lse2)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", ["default", "forward-all", "one-pass"])
@pytest.mark.parametrize("n,m,d", [(40, 90, 40), (17, 40, 130)], ids=["one-d-chunk", "d-chunks"])
def test_int32_labels_give_the_int64_results(n, m, d, variant):
    """int32 labels (the kernels compare them in 32 bits) give bit for bit what the same labels
    in int64 give, with one d chunk (dz/dk load each tile once) and with several."""
    inp, g = make_inputs(n, m, d, torch.bfloat16, num_classes=6, self_offset=3)
    wide = run_kernels(inp, g, False, variant)
    narrow = dict(inp, row_labels=inp["row_labels"].int(), col_labels=inp["col_labels"].int())
    for name, out, ref in zip(("lse", "dz", "dk"), run_kernels(narrow, g, False, variant), wide):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.triton_interpret
def test_triton_ops_take_int32_labels():
    """The Triton ops take int32 labels as well as int64 ones (row and column labels of one
    dtype); the other ops keep the int64 contract."""
    from rcl_kernels.kernels import contract

    inp, g = make_inputs(17, 30, 20, torch.float32, self_offset=2)
    args = (inp["z"], inp["k"], inp["row_labels"].int(), inp["col_labels"].int(),
            inp["row_bias"], inp["col_bias"])
    options = (inp["self_offset"], inp["scale"], False, "default")
    ops = torch.ops.rcl_kernels
    lse = ops.triton_lse_forward(*args, *options)
    dz, dk = ops.triton_lse_backward(g, *args, lse, *options)
    ref = run_kernels(inp, g, False)
    for out, r in zip((lse, dz, dk), ref):
        torch.testing.assert_close(out, r, rtol=0, atol=0)
    mixed = (*args[:3], inp["col_labels"], *args[4:])
    with pytest.raises(RuntimeError, match="col_labels must be torch.int32"):
        ops.triton_lse_forward(*mixed, *options)
    with pytest.raises(RuntimeError, match="row_labels must be torch.int64"):
        contract.check_lse_args(*args)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", ["default", "one-pass"])
def test_backward_deterministic(variant):
    inp, g = make_inputs(17, 60, 20, torch.bfloat16)
    a = run_kernels(inp, g, False, variant, num_splits=2, dz_splits=3, dk_splits=2)
    b = run_kernels(inp, g, False, variant, num_splits=2, dz_splits=3, dk_splits=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.triton_interpret
def test_one_pass_tickets_and_turns(monkeypatch):
    """The deterministic one-pass kernel takes its work from a ticket counter (sem[0]: one ticket
    per program) and passes one turn per column block on every row block (sem[1 + row block];
    under the interpreter one release stands for all threads of a program), on fresh zeroed
    counters for every launch; both launches match the float64 formula."""
    n, m = 40, 70
    made = []
    make = launch._one_pass_sems
    monkeypatch.setattr(launch, "_one_pass_sems", lambda *a: made.append(make(*a)) or made[-1])
    inp, g = make_inputs(n, m, 33, torch.bfloat16, self_offset=2)
    for _ in range(2):
        check_against_oracle(inp, g, torch.bfloat16, False, "one-pass", dk_splits=2)
    bm, bn = configs._INTERP_ONE_PASS["BLOCK_M"], configs._INTERP_ONE_PASS["BLOCK_N"]
    col_blocks, row_blocks, splits = -(-m // bn), -(-n // bm), 2
    expected = [col_blocks * splits] + [col_blocks] * row_blocks
    assert len(made) == 2 and made[0] is not made[1]
    for sems in made:
        assert sems[:1 + row_blocks].tolist() == expected and not sems[1 + row_blocks:].any()


@pytest.mark.triton_interpret
def test_tiny_grad_fp16_does_not_underflow():
    """g of a mean over a million anchors: g·p would underflow in fp16 without max|g| scaling."""
    inp, g = make_inputs(17, 40, 20, torch.float16)
    g = g * 1e-6
    check_against_oracle(inp, g, torch.float16, False)


@triton.jit
def _round_tf32_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, jit_helpers._round_tf32(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def tf32_rounding_cases():
    """fp32 bit patterns: random ones over the whole range, every kind of tie, the neighbours of
    ties, subnormals (one rounds up into the normals), the largest finite values (they round to
    inf), zeros, infinities and NaNs (quiet, signalling, payload only in the dropped bits)."""
    gen = torch.Generator().manual_seed(11)
    rand = torch.randint(-(2**31), 2**31, (1 << 16,), generator=gen, dtype=torch.int64)
    high = rand & ~0x1FFF  # every exponent, sign and kept mantissa, with chosen dropped bits
    dropped = torch.tensor([0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF])
    specials = torch.tensor([
        0x00000000, 0x80000000, 0x00000001, 0x00001000, 0x00002000, 0x00003000, 0x007FFFFF,
        0x007FF000, 0x807FF000, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7FF000, 0x7F7FEFFF,
        0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F801000, 0x7FBFFFFF,
        0x3F800000, 0x3F801000, 0x3F803000, 0xBF801000, 0xBF803000,
    ])
    bits = torch.cat([rand, (high[:, None] | dropped[None, :]).flatten(), specials])
    return ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)


@pytest.mark.triton_interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy meets NaN and inf under the interpreter
def test_round_tf32_bit_exact():
    """The kernels' fp32 -> TF32 rounding against round_tf32, bit for bit (NaN: any NaN)."""
    x = tf32_rounding_cases()
    ref = round_tf32(x)
    xd = x.to(DEVICE)
    out = torch.empty_like(xd)
    _round_tf32_kernel[(triton.cdiv(x.numel(), 1024),)](xd, out, x.numel(), BLOCK=1024)
    out = out.cpu()
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out), nan)
    got, want = out[~nan].view(torch.int32), ref[~nan].view(torch.int32)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(hex(x[~nan].view(torch.int32)[i].item() & 0xFFFFFFFF),
                               hex(got[i].item() & 0xFFFFFFFF), hex(want[i].item() & 0xFFFFFFFF))
                              for i in bad[:5]]


def test_round_tf32_reference():
    """The reference rounding itself, on hand-worked values."""
    cases = {
        1.0 + 2.0**-11: 1.0 + 2.0**-10,  # a tie rounds away from zero, to odd as well as even
        1.0 + 3 * 2.0**-11: 1.0 + 2 * 2.0**-10,
        -(1.0 + 2.0**-11): -(1.0 + 2.0**-10),
        1.0 + 2.0**-11 - 2.0**-23: 1.0,
        2.0**-149: 0.0,  # smallest subnormal: far below half a TF32 subnormal step (2^-136)
        2.0**-137: 2.0**-136,  # half a subnormal step: a tie
        float(torch.finfo(torch.float32).max): float("inf"),
        -float(torch.finfo(torch.float32).max): float("-inf"),
        float("inf"): float("inf"),
    }
    x = torch.tensor(list(cases), dtype=torch.float32)
    assert torch.equal(round_tf32(x), torch.tensor(list(cases.values()), dtype=torch.float32))
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()


@pytest.mark.triton_interpret
def test_tf32_products_round_to_nearest():
    """With allow_tf32 the products see z and k rounded to nearest TF32 (truncated
    operands bias the loss, by 4e-5 on an H100). The kernels' lse must match the float64 formula on
    the rounded inputs to fp32 accuracy: unrounded or truncated operands miss it by ~1e-4."""
    inp, g = make_inputs(40, 70, 96, torch.float32, self_offset=1)
    lse = launch.forward(**inp, allow_tf32=True).cpu().double()
    rounded = dict(inp, z=round_tf32(inp["z"]), k=round_tf32(inp["k"]))
    ref = dense_op(**{key: v.cpu() if isinstance(v, torch.Tensor) else v
                      for key, v in rounded.items()}, g=g.cpu(), dtype=torch.float64)[0]
    err = (lse - ref).abs().max().item()
    assert err < 2e-5, f"lse differs from the rounded-input formula by {err:.2e}"


@pytest.mark.triton_interpret
def test_3xtf32_is_as_accurate_as_fp32():
    """3xTF32 products (hi/lo TF32 parts, three products) are as accurate as fp32 ones: lse, dz
    and dk within 2x the error of the dense fp32 formula, with no floor, where TF32 products
    are ~1000x worse for the gradients. Under the interpreter the products of TF32 parts are
    exact, as on tensor cores, so this checks the split itself (with the forward flags too; the
    oracle tests run the 3xtf32 preset)."""
    variant = Variant(fp32_highest="tf32x3", exp2=True, lean_masks=True, resident_z=True)
    inp, g = make_inputs(32, 64, 96, torch.float32, self_offset=1)
    ref64 = dense_op(**inp, g=g, dtype=torch.float64)
    fp32 = dense_op(**inp, g=g, dtype=torch.float32)
    split = run_kernels(inp, g, False, variant)
    tf32 = run_kernels(inp, g, True, variant)
    for name, x3, t32, base, ref in zip(("lse", "dz", "dk"), split, tf32, fp32, ref64):
        # floor=0: as accurate as the fp32 formula itself, with no allowance beyond 2x its error.
        assert_within_rule(f"{name} 3xTF32", x3, base, ref, torch.float32, floor=0.0)
        err = rel_err(x3, ref)
        if name != "lse":  # lse errors are tiny either way (a log of a sum)
            assert rel_err(t32, ref) > 20 * err, f"{name}: TF32 as accurate as 3xTF32?"


def test_oracle_gradient_matches_autograd():
    """The dense formula's dz/dk are the gradients of Σ g·lse (float64 autograd)."""
    inp, g = make_inputs(7, 11, 5, torch.float64, self_offset=1, device="cpu")
    z = inp["z"].clone().requires_grad_()
    k = inp["k"].clone().requires_grad_()
    args = dict(inp, z=z, k=k)
    lse, dz, dk = dense_op(**args, g=g, dtype=torch.float64)
    gz, gk = torch.autograd.grad((lse * g).sum(), [z, k])
    torch.testing.assert_close(dz, gz)
    torch.testing.assert_close(dk, gk)


@triton.jit
def _offsets_kernel(out_ptr, row, stride, split, rows, width):
    tl.store(out_ptr, jit_helpers._row_offset(row, stride))
    tl.store(out_ptr + 1, jit_helpers._split_offset(split, rows, row, width))


@pytest.mark.triton_interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # int32 overflow warnings, if any
def test_offsets_are_64_bit():
    """Offsets at N = 2^21 anchors with d = 1024 pass 2^31: the last row of the second split of a
    [2, N, d] partial starts at (2^21 + 2^21 − 1)·1024 ≈ 2^32, which 32-bit arithmetic wraps."""
    n, d, row = 2**21, 1024, 2**21 - 1
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, row, d, 1, n, d)
    assert out.tolist() == [row * d, (n + row) * d]
    assert (n + row) * d >= 2**31 and row * d < 2**31  # only the split offset needs 64 bits


def test_split_workspace_stays_in_budget(monkeypatch):
    """Every split count comes from the planner, and the partials of a split reduction fit its
    workspace budget, also where their byte count overflows 32 bits (N = 2^21, d = 1024)."""
    monkeypatch.setattr(planner, "INTERPRETER_SM_COUNT", 132)  # an H100's worth of programs
    budget = planner.WORKSPACE_BUDGET_BYTES
    cpu = torch.device("cpu")
    # BCL on iNaturalist (N = 512, M = 8654, d = 1024): few row blocks, so dz splits the columns.
    per, count = launch.split_layout("dz", 8, 8654, 4 * 512 * 1024, cpu)
    assert count > 1 and count * 4 * 512 * 1024 <= budget and per * count >= 8654
    # N = 2^21 rows and few columns: dk would split the rows, but one [M, d] partial per split
    # of M = 2^20 columns is 4 GiB (2^32 bytes): the budget allows a single split.
    assert launch.split_layout("dk", 1, 2**21, 4 * 2**20 * 1024, cpu)[1] == 1
    # The forward's partials (max and sum per row) are small: the planner's own cap applies.
    assert launch.split_layout("forward", 8, 8654, 8 * 512, cpu)[1] > 1


@pytest.mark.triton_interpret
def test_kernel_partials_stay_in_budget(monkeypatch):
    """The buffers the kernels allocate for split partials never exceed the workspace budget."""
    monkeypatch.setattr(planner, "INTERPRETER_SM_COUNT", 64)
    budget = 40 * 48 * 4 * 3  # three [40, 48] fp32 dz partials
    monkeypatch.setattr(planner, "WORKSPACE_BUDGET_BYTES", budget)
    shapes = []
    alloc = launch._alloc

    def spy(shape, device, dtype):
        shapes.append(tuple(shape))
        return alloc(shape, device, dtype)

    monkeypatch.setattr(launch, "_alloc", spy)
    # Enough columns for several splits of at least MIN_TILES_PER_SPLIT split-aligned tiles.
    inp, g = make_inputs(40, 16 * launch._SPLIT_ALIGN + 5, 48, torch.float32)
    check_against_oracle(inp, g, torch.float32, False)
    # [splits, rows, d] buffers with more than one split hold partials (one split: the output).
    partials = [shape for shape in shapes if len(shape) == 3 and shape[0] > 1]
    assert partials, "the test should make the kernels split"
    assert all(shape[0] * shape[1] * shape[2] * 4 <= budget for shape in partials), partials


def test_unavailable_reason():
    assert backend.unavailable_reason(DEVICE) is None
    if not HAS_CUDA:
        assert isinstance(backend.unavailable_reason(torch.device("cuda")), str)
    assert isinstance(backend.unavailable_reason(torch.device("meta")), str)


def test_unavailable_reason_interpret_set_after_import(monkeypatch):
    """Kernels built compiled refuse CPU tensors, and say why when TRITON_INTERPRET was set too
    late (available_backends() claimed triton then)."""
    monkeypatch.setattr(backend, "INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "after" in backend.unavailable_reason(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "not set" in backend.unavailable_reason(torch.device("cpu"))


@pytest.mark.triton_interpret
def test_empty_inputs():
    inp, g = make_inputs(4, 6, 8, torch.float32)
    lse = launch.lse_forward(**dict(inp, k=inp["k"][:0], col_labels=inp["col_labels"][:0],
                                      col_bias=inp["col_bias"][:0]), allow_tf32=False)
    assert torch.all(lse.cpu() == NEG_INF)


# --------------------------------------------------------------------------------------------------
# Full-size shapes on a GPU
# --------------------------------------------------------------------------------------------------
_INAT = (512, 8654, 1024, 0, True)  # BCL on iNaturalist: B=256, C=8142, d=1024 (M >> N)
_LARGE = (4096, 4096 + 1000, 128, 0, True)  # large-batch shape, C=1000
GPU_CASES = [
    pytest.param(*_LARGE, torch.bfloat16, False, id="N4096-d128-bf16"),
    pytest.param(*_LARGE, torch.float16, False, id="N4096-d128-fp16"),
    pytest.param(*_LARGE, torch.float32, False, id="N4096-d128-fp32"),
    pytest.param(*_LARGE, torch.float32, True, id="N4096-d128-tf32"),
    pytest.param(4096, 4096 + 1000, 1024, 0, True, torch.bfloat16, False, id="N4096-d1024-bf16"),
    pytest.param(*_INAT, torch.bfloat16, False, id="inat-N512-M8654-d1024-bf16"),
    pytest.param(*_INAT, torch.float32, True, id="inat-N512-M8654-d1024-tf32"),
    pytest.param(*_INAT, torch.float16, False, id="inat-N512-M8654-d1024-fp16"),
    pytest.param(1000, 3 * 1000 + 17, 130, 1000, False, torch.bfloat16, False,
                 id="offset-d130-bf16"),
    pytest.param(4099, 33, 20, 0, False, torch.float32, False, id="NggM-odd-fp32"),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["default", "one-pass", "one-pass-atomic"])
@pytest.mark.parametrize("n,m,d,self_offset,protos,dtype,allow_tf32", GPU_CASES)
def test_gpu_large(n, m, d, self_offset, protos, dtype, allow_tf32, variant):
    """The timed kernels, and every forward flag with the one-pass backward in both forms."""
    inp, g = make_inputs(n, m, d, dtype, num_classes=50, self_offset=self_offset,
                         with_prototypes=protos)
    check_against_oracle(inp, g, dtype, allow_tf32, variant)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", ["default", "forward-all", "one-pass"])
def test_every_config(variant):
    """Each config the autotuner may pick, run on its own (odd d spanning two d chunks): the
    GPU's block sizes under the interpreter too, at a small size.

    bf16 only, to bound compile time; the other dtypes run the first config elsewhere."""
    d = 300 if HAS_CUDA and variant != "one-pass" else 130
    kernels = ("forward", *configs.backward_kernels(variant, d, torch.bfloat16))
    per_kernel = {name: configs.kernel_configs(name, variant, d) for name in kernels}
    if HAS_CUDA:
        inp, g = make_inputs(300, 1100, d, torch.bfloat16, num_classes=20, self_offset=7)
    else:
        inp, g = make_inputs(40, 150, d, torch.bfloat16, num_classes=20, self_offset=7)
    keys = {"forward": "config", "dz": "dz_config", "dk": "dk_config",
            "one_pass": "one_pass_config"}
    for i in range(max(len(c) for c in per_kernel.values())):
        chosen = {keys[name]: c[i % len(c)] for name, c in per_kernel.items()}
        check_against_oracle(inp, g, torch.bfloat16, False, variant, **chosen)


def test_one_pass_takes_d_up_to_its_limit():
    """One pass for tensor-core products up to its d; fp32 FMA and 3xTF32 run two passes."""
    for dtype, tf32, limit in ((torch.bfloat16, False, 256), (torch.float16, False, 256),
                               (torch.float32, True, 128)):
        assert configs.backward_kernels("one-pass", limit, dtype, tf32) == ("one_pass",)
        assert configs.backward_kernels("one-pass", limit + 1, dtype, tf32) == ("dz", "dk")
    assert configs.backward_kernels("one-pass", 16, torch.float32, False) == ("dz", "dk")
    three = Variant(backward="one_pass", fp32_highest="tf32x3")
    assert configs.backward_kernels(three, 16, torch.float32, False) == ("dz", "dk")
    assert configs.backward_kernels("default", 16, torch.bfloat16) == ("dz", "dk")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", ["one-pass", "one-pass-atomic"])
def test_one_pass_runs_one_kernel(variant, monkeypatch):
    """The one-pass backward launches one kernel, with row splits when asked to."""
    launched = []
    run = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda name, *a: (launched.append(name), run(name, *a)))
    inp, g = make_inputs(40, 70, 33, torch.bfloat16, self_offset=2)
    check_against_oracle(inp, g, torch.bfloat16, False, variant, dk_splits=2)
    assert launched == ["forward", "one_pass"]


@pytest.mark.triton_interpret
def test_config_benchmark_smoke(tmp_path):
    """bench/triton_configs.py runs end to end under the interpreter and writes one row per
    config (and one autotuned row) of every kernel each variant runs, kernels shared by variants
    once."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "rows.json"
    variants = ["default", "one-pass", "3xtf32"]
    script = Path(__file__).resolve().parents[1] / "bench" / "triton_configs.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out), "--dtypes",
                    "bf16", "fp32", "--variants", *variants], check=True, timeout=600,
                   capture_output=True)
    rows = json.loads(out.read_text())
    for row in rows:
        assert row["median_ms"] > 0 and "error" not in row, row
        for field in ("kernel", "variant", "config", "shape", "dtype", "device", "commit"):
            assert row[field], (field, row)
    d = 48  # the smoke shape's
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for name in variants:
            for kernel in ("forward", *configs.backward_kernels(name, d, dtype)):
                timed = [r["config"] for r in rows if r["dtype"] == dtype_name
                         and r["kernel"] == kernel and name in r["variant"].split(",")]
                expected = configs.kernel_configs(kernel, name, d)
                assert len(timed) == len(expected) + 1 and timed[-1] == "autotune", (
                    dtype_name, name, kernel, timed)


def test_variant_presets_and_errors():
    assert Variant.of("default") == Variant()
    assert Variant.of(VARIANTS["forward-all"]) is VARIANTS["forward-all"]
    with pytest.raises(ValueError, match="variant must be"):
        Variant.of("fastest")
    with pytest.raises(ValueError, match="group_m"):
        Variant(group_m=0)
    with pytest.raises(TypeError, match="exp2"):
        Variant(exp2=1)
    with pytest.raises(ValueError, match="fp32_highest"):
        Variant(fp32_highest="tf32")
    with pytest.raises(ValueError, match="backward"):
        Variant(backward="three_pass")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["default", "one-pass"])
def test_gpu_nan_and_determinism(variant):
    """Bitwise repeatable (the one-pass dz: column blocks add in order), NaN where it belongs."""
    inp, g = make_inputs(2048, 3000, 256, torch.bfloat16)
    a = run_kernels(inp, g, False, variant)
    b = run_kernels(inp, g, False, variant)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    inp["k"][10, 0] = float("nan")
    lse = launch.lse_forward(**inp, allow_tf32=False, variant=variant)
    expect = torch.ones(2048, dtype=torch.bool)
    expect[10] = False  # column 10 is row 10's self column
    assert torch.equal(torch.isnan(lse).cpu(), expect)
