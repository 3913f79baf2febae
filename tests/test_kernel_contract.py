"""One argument contract for every fused candidate's kernel ops (Kernels.forward / backward /
loss_forward_backward), generated from the backend registry, so a new candidate is covered
without listing it here.

- opcheck (schema, fake kernel, real kernel agree) of every rcl_kernels op a candidate's Kernels
  call, recorded as they run: on the CPU for each candidate that runs here (the Triton variants
  too, where the tests set TRITON_INTERPRET), on a GPU for each CUDA candidate (skipped without one);
- the fake kernels of every fused candidate refuse what the real ones refuse;
- the label dtypes each op takes (int64; int32 too for Triton), and a NaN scale gives a NaN lse
  and NaN gradients, never a finite or infinite number."""

import math

import pytest
import torch
from helpers import draw_labels, fresh_generator, random_features
from torch.utils._python_dispatch import TorchDispatchMode

from rcl_kernels import dispatch
from rcl_kernels._dtypes import accumulation_dtype
from rcl_kernels.kernels import planner
from rcl_kernels.kernels.contract import EXTENSION_ERROR


def _cpu_candidates():
    out = []
    for backend, candidate in dispatch.all_candidates():
        if not candidate.fused or "cpu" not in backend.device_types:
            continue
        if backend.unavailable_reason(torch.device("cpu")) is not None:
            continue
        if candidate.requirement is not None and candidate.requirement(torch.device("cpu")):
            continue
        out.append(candidate)
    return out


CANDIDATES = _cpu_candidates()


def _problem(n=5, c=3, d=8, label_dtype=torch.int64):
    z = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    labels = torch.randint(0, c, (n,)).to(label_dtype)
    bias = torch.zeros(n)
    return z, labels, bias


def _forward(candidate, z, labels, bias, scale):
    kernels = candidate.lse
    return kernels.forward(z, z, labels, labels, bias, bias, 0, scale, False)


def _runs_here(backend, candidate, device: str) -> str | None:
    """Why `candidate` cannot run its ops on `device` here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    reason = backend.unavailable_reason(torch.device(device))
    if reason is None and candidate.requirement is not None:
        reason = candidate.requirement(torch.device(device))
    return reason


def _params(device: str, dtypes=None):
    """pytest.params of every fused candidate (x dtype) on `device`, skipped with the reason where
    it cannot run."""
    out = []
    for backend, candidate in dispatch.all_candidates():
        if not candidate.fused or device not in backend.device_types:
            continue
        reason = _runs_here(backend, candidate, device)
        marks = [pytest.mark.skip(reason=f"{candidate.name}: {reason}")] if reason else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        elif backend.name == "triton":
            marks.append(pytest.mark.triton_interpret)
        for dtype in dtypes(backend) if dtypes else [None]:
            values = (candidate,) if dtypes is None else (candidate, dtype)
            suffix = "" if dtype is None else f"-{str(dtype).removeprefix('torch.')}"
            out.append(pytest.param(*values, marks=marks, id=f"{candidate.name}{suffix}"))
    return out


def test_every_cpu_candidate_is_covered():
    names = {c.name for c in CANDIDATES}
    assert {"cpu:tiled", "cpu:streaming"} <= names, names


# The Triton ops also take int32 labels (compared in 32 bits); the C++ ops take int64 only.
ACCEPTED_LABEL_DTYPES = {"triton": (torch.int64, torch.int32)}


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.name)
def test_labels_must_be_of_an_accepted_integer_dtype(candidate):
    accepted = ACCEPTED_LABEL_DTYPES.get(candidate.backend, (torch.int64,))
    for dtype in (torch.int64, torch.int32, torch.int16):
        z, labels, bias = _problem(label_dtype=dtype)
        if dtype in accepted:
            assert torch.isfinite(_forward(candidate, z, labels, bias, 10.0)).all()
        else:
            with pytest.raises(RuntimeError, match="int64"):
                _forward(candidate, z, labels, bias, 10.0)


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.name)
def test_a_nan_scale_gives_nan_everywhere(candidate):
    z, labels, bias = _problem()
    lse = _forward(candidate, z, labels, bias, math.nan)
    assert torch.isnan(lse).all(), lse
    dz, dk = candidate.lse.backward(torch.ones_like(lse), z, z, labels, labels, bias, bias, lse, 0,
                                    math.nan, False)
    assert torch.isnan(dz).all() and torch.isnan(dk).all()


@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.name)
def test_the_candidates_agree_on_a_finite_problem(candidate):
    torch.manual_seed(0)
    z, labels, bias = _problem(n=7, c=2, d=16)
    got = _forward(candidate, z, labels, bias, 10.0)
    # the dense formula: lse_i over j != i of scale·<z_i, z_j> + bias_j
    t = 10.0 * z.double() @ z.double().T
    t.fill_diagonal_(-math.inf)
    torch.testing.assert_close(got.double(), torch.logsumexp(t, dim=1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# opcheck and the fake kernels, per candidate
# --------------------------------------------------------------------------------------------------
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


def op(name):
    return getattr(torch.ops.rcl_kernels, name).default


class _OpRecorder(TorchDispatchMode):
    """Records every rcl_kernels op a candidate's Kernels call, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rcl_kernels":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def kernel_op_calls(candidate, args, monkeypatch):
    """[(op, args, kwargs)] of the candidate's forward, backward and (where it has one)
    loss_forward_backward on `args`. The tiled ops get blocks of 5 rows: several row blocks at
    these sizes."""
    monkeypatch.setattr(planner, "tiled_block_rows", lambda *a, **k: 5)
    kernels = candidate.lse
    with _OpRecorder() as recorder:
        lse = kernels.forward(*args, 0, 3.0, False)
        kernels.backward(torch.rand_like(lse), *args, lse, 0, 3.0, False)
        if kernels.loss_forward_backward is not None:
            weights = torch.rand(args[0].shape[0], dtype=args[4].dtype, device=args[0].device)
            kernels.loss_forward_backward(weights, *args, 0, 3.0, False)
    assert recorder.calls, f"{candidate.name} called no rcl_kernels op"
    return recorder.calls


def _cpu_dtypes(backend):
    return [dt for dt in (torch.float64, torch.float32) if dt in backend.dtypes]


@pytest.mark.parametrize("candidate,dtype", _params("cpu", _cpu_dtypes))
def test_opcheck_kernel_ops(candidate, dtype, monkeypatch):
    """Schema, fake kernel and real kernel agree for every op the candidate calls on the CPU."""
    for func, args, kwargs in kernel_op_calls(candidate, lse_args(dtype), monkeypatch):
        torch.library.opcheck(func, args, kwargs)


def _gpu_dtypes(backend):
    return [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("candidate,dtype", _params("cuda", _gpu_dtypes))
def test_opcheck_gpu_kernel_ops(candidate, dtype, monkeypatch):
    """Schema, fake kernel and real kernel agree for every GPU op."""
    args = [t.cuda() for t in lse_args(torch.float32)]
    args[0], args[1] = args[0].to(dtype), args[1].to(dtype)
    for func, op_args, kwargs in kernel_op_calls(candidate, args, monkeypatch):
        torch.library.opcheck(func, op_args, kwargs)


@pytest.mark.parametrize("candidate", _params("cuda"))
def test_gpu_kernel_ops_refuse_per_anchor_vectors_on_the_host(candidate):
    """The kernels read lse, grad_lse and the tiled weights through raw pointers: one of them on
    the CPU beside CUDA features must raise an error naming it, not reach a kernel."""
    kernels = candidate.lse
    args = [t.cuda() for t in lse_args(torch.float32)]
    lse = kernels.forward(*args, 0, 3.0, False)
    grad = torch.ones_like(lse)
    for name, bad_grad, bad_lse in (("grad_lse", grad.cpu(), lse), ("lse", grad, lse.cpu())):
        with pytest.raises(RuntimeError, match=rf"\b{name} must"):
            kernels.backward(bad_grad, *args, bad_lse, 0, 3.0, False)
    if kernels.loss_forward_backward is not None:
        with pytest.raises(RuntimeError, match="weights must"):
            kernels.loss_forward_backward(grad.cpu(), *args, 0, 3.0, False)
    torch.cuda.synchronize()


def test_opcheck_tiled_loss_forward_backward():
    for dtype in (torch.float64, torch.float32):
        args = lse_args(dtype)
        weights = torch.rand(args[0].shape[0], dtype=args[4].dtype)
        torch.library.opcheck(op("tiled_loss_forward_backward"), (weights, *args, 0, 3.0, 5))


def _fake_params():
    """Every fused candidate: fake kernels run without the device, so the CUDA ones' fakes are
    checked here too (their ops exist whenever rcl_kernels._C loads)."""
    out = []
    for backend, candidate in dispatch.all_candidates():
        if not candidate.fused:
            continue
        reason = (backend.unavailable_reason(torch.device("cpu")) if "cpu" in backend.device_types
                  else EXTENSION_ERROR)
        marks = [pytest.mark.skip(reason=f"{candidate.name}: {reason}")] if reason else []
        out.append(pytest.param(candidate, marks=marks, id=candidate.name))
    return out


@pytest.mark.parametrize("candidate", _fake_params())
def test_fake_kernels_check_shapes(candidate):
    """Under FakeTensorMode the ops run their fake kernels, which must refuse what the real
    kernels refuse (shapes, dtypes) instead of returning outputs of a made-up shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels = candidate.lse
    z, k, labels, col_labels, row_bias, col_bias = lse_args(torch.float32)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (z, k, labels, col_labels, row_bias, col_bias)]
        lse = kernels.forward(*fake, 0, 3.0, False)
        assert lse.shape == (z.shape[0],) and lse.dtype == torch.float32
        dz, dk = kernels.backward(lse, *fake, lse, 0, 3.0, False)
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
                kernels.forward(*args, 0, 3.0, False)
