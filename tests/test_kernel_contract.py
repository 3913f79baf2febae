"""One argument contract for every fused candidate's kernel ops (Kernels.forward / backward),
generated from the backend registry: each candidate that runs on this machine's CPU (the Triton
variants too, where the tests set TRITON_INTERPRET) gets the same inputs and must answer alike:
the label dtypes each op takes (int64; int32 too for Triton), and a NaN scale gives a NaN lse and NaN gradients, never a finite or infinite
number."""

import math

import pytest
import torch

from rcl_kernels import dispatch


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
