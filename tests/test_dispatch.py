"""The backend registry: capability tables, refusals that list every reason, and auto's choice,
read from the Backend objects without needing the hardware they describe."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from rcl_kernels import dispatch
from rcl_kernels.dispatch import BACKENDS, Problem, select_backend


def problem(device="cpu", dtype=torch.float32, rows=64, columns=128, dim=16):
    return Problem(torch.device(device), dtype, rows, columns, dim)


def test_cuda_streaming_refuses_a_dim_above_its_limit_with_the_reason():
    """d = 5000 is past the wmma kernels' limit: the capability table refuses it,
    naming d and the limit, and the tiled algorithm (no limit) still takes it."""
    cuda = BACKENDS["cuda"]
    big = problem("cuda", dim=5000)
    assert any("d <= 4096, got d=5000" in r for r in cuda.algorithm_reasons(big, "streaming"))
    assert cuda.algorithm_reasons(big, "tiled") == []
    assert cuda.default_algorithm(big) == "tiled"
    assert cuda.default_algorithm(problem("cuda", dim=4096)) == "streaming"
    reasons = cuda.not_supported_reasons(big, "streaming")
    assert any("d=5000" in r for r in reasons)
    if not torch.cuda.is_available():  # every reason is listed, not just the first
        assert any("CUDA" in r for r in reasons)


def test_refusals_list_every_reason():
    triton = BACKENDS["triton"]
    reasons = triton.not_supported_reasons(problem("meta", torch.float64), "tiled")
    assert len(reasons) == 3, reasons
    assert any("meta" in r for r in reasons)
    assert any("float64" in r for r in reasons)
    assert any("'tiled'" in r for r in reasons)


def test_explicit_backend_raises_with_every_reason():
    with pytest.raises(ValueError, match="backend='triton'.*float64"):
        select_backend("triton", "auto", problem(dtype=torch.float64), allow_tf32=False)
    with pytest.raises(ValueError, match="algorithm"):
        select_backend("cpu", "fastest", problem(), allow_tf32=False)


def test_auto_on_cpu_picks_the_measured_fused_backend():
    candidate, algorithm = select_backend("auto", "auto", problem(), allow_tf32=False)
    assert (candidate.name, algorithm) == ("cpu:tiled", "tiled")
    candidate, algorithm = select_backend("auto", "streaming", problem(), allow_tf32=False)
    assert (candidate.name, algorithm) == ("cpu:streaming", "streaming")
    # Small and wide, BCL's own shape (N = 512, M = 1,512, d = 1024) included: tiled too.
    for rows, columns in ((256, 1256), (512, 1512)):
        candidate, _ = select_backend("auto", "auto", problem(rows=rows, columns=columns, dim=1024),
                                      False)
        assert candidate.name == "cpu:tiled"


def test_auto_on_cuda_follows_the_measured_crossover():
    """The order comes from the H100 run of 2026-11-26 (docs/gpu-status.md): the reference
    wins up to N·M = 512·8654, triton above it, cuda for fp32 "highest"."""
    order = dispatch.static_order
    assert order(problem("cuda", rows=512, columns=8654), False)[0] == "reference"
    assert order(problem("cuda", torch.bfloat16, rows=8192, columns=9192), False)[0] == "triton:streaming"
    assert order(problem("cuda", rows=32768, columns=33768), allow_tf32=False)[0] == "cuda:streaming"
    assert order(problem("cuda", rows=32768, columns=33768), allow_tf32=True)[0] == "triton:streaming"


def test_auto_warns_once_before_falling_back_and_raises_above_the_budget(monkeypatch):
    """When no fused backend takes an input, auto says why each refused before it runs the N x M
    reference, and refuses when the reference would not fit its memory budget."""
    for name in ("cpu", "triton"):
        off = dataclasses.replace(BACKENDS[name], availability=lambda device: "switched off by the test")
        monkeypatch.setitem(BACKENDS, name, off)
    dispatch._warn_once.cache_clear()
    small = problem(rows=100, columns=100)
    with pytest.warns(RuntimeWarning, match="falls back to the N x M reference.*cpu: switched off"):
        candidate, _ = select_backend("auto", "auto", small, allow_tf32=False)
    assert candidate.name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        select_backend("auto", "auto", small, allow_tf32=False)
    huge = problem(rows=65536, columns=66536)
    with pytest.raises(ValueError, match="GiB.*budget.*backend='reference'"):
        select_backend("auto", "auto", huge, allow_tf32=False)
    candidate, _ = select_backend("reference", "auto", huge, allow_tf32=False)  # explicit: runs
    assert candidate.name == "reference"
    with pytest.raises(ValueError, match="algorithm='tiled'"):
        select_backend("auto", "tiled", small, allow_tf32=False)  # a forced algorithm never falls back


def test_auto_raises_when_not_even_the_reference_can_run():
    with pytest.raises(ValueError, match="no backend can run.*reference: it runs on cpu/cuda"):
        select_backend("auto", "auto", problem("meta"), allow_tf32=False)


VARIANT_SCRIPT = """
import torch, rcl_kernels as rk
torch.manual_seed(0)
# bf16: the one-pass backward applies to tensor-core dtypes (fp32 keeps the two-pass kernels).
f = torch.nn.functional.normalize(torch.randn(24, 2, 20), dim=-1).bfloat16().requires_grad_()
c = torch.nn.functional.normalize(torch.randn(5, 20), dim=-1).bfloat16()
y = torch.randint(0, 5, (24,))
try:
    loss = rk.bcl_loss(f, y, c, backend="triton")
except ValueError as error:
    print("refused:", error)
else:
    loss.backward()
    f64 = f.detach().double().requires_grad_()
    ref = rk.bcl_loss(f64, y, c.double(), backend="reference")
    ref.backward()
    print("error:", max(abs(loss.item() - ref.item()), (f.grad.double() - f64.grad).abs().max().item()))
"""


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", ["one-pass", "exp2-lean-resident", "no-such-variant"])
def test_triton_variant_is_chosen_by_environment(variant):
    """RCL_KERNELS_TRITON_VARIANT selects an untimed Triton variant for the whole process; a name
    that is not a variant makes the backend refuse with the variable named."""
    import os
    import subprocess
    import sys

    if rk_backends_triton_reason() is not None:
        pytest.skip(f"triton: {rk_backends_triton_reason()}")
    env = {**os.environ, "RCL_KERNELS_TRITON_VARIANT": variant}
    out = subprocess.run([sys.executable, "-c", VARIANT_SCRIPT], env=env, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr
    if variant == "no-such-variant":
        assert "RCL_KERNELS_TRITON_VARIANT='no-such-variant'" in out.stdout
    else:
        assert float(out.stdout.split("error:")[1]) < 3e-2  # bf16 inputs, float64 truth


def rk_backends_triton_reason():
    return BACKENDS["triton"].unavailable_reason(torch.device("cpu"))


def test_cuda_variant_is_chosen_by_environment():
    """RCL_KERNELS_CUDA_VARIANT=mma swaps the cuda backend's streaming kernels for the untimed
    mma.sync ones (no d limit); the default stays the timed wmma kernels; a bad name refuses."""
    import os
    import subprocess
    import sys

    script = ("from rcl_kernels.dispatch import BACKENDS; import torch; "
              "print(BACKENDS['cuda'].kernels['streaming'].max_dim, "
              "BACKENDS['cuda'].unavailable_reason(torch.device('cuda')))")
    results = {}
    for variant in ("", "mma", "bogus"):
        env = dict(os.environ)
        env.pop("RCL_KERNELS_CUDA_VARIANT", None)
        if variant:
            env["RCL_KERNELS_CUDA_VARIANT"] = variant
        out = subprocess.run([sys.executable, "-c", script], env=env, text=True,
                             capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        results[variant] = out.stdout.strip()
    assert results[""].startswith("4096")
    assert results["mma"].startswith("None")
    assert "RCL_KERNELS_CUDA_VARIANT='bogus'" in results["bogus"]


def test_every_variant_is_selectable_by_argument():
    """backend="<backend>:<variant>" picks one candidate; "<backend>:<algorithm>" the backend's
    default variant of it; the candidate's algorithm is the one that runs."""
    cuda = problem("cuda")
    assert not dispatch.resolve("cuda:mma")[1].lse.max_dim  # the mma kernels take any d
    for name in dispatch.candidate_names():
        backend, candidate, _ = dispatch.resolve(name)
        assert candidate is not None or name == "reference"
        if candidate is not None:
            assert candidate.name == name and candidate.backend == backend.name
    assert dispatch.resolve("triton:one-pass")[1].variant == "one-pass"
    assert dispatch.resolve("cuda:streaming") == (BACKENDS["cuda"], None, "streaming")
    candidate, algorithm = select_backend("cpu:streaming", "auto", problem(), allow_tf32=False)
    assert (candidate.name, algorithm) == ("cpu:streaming", "streaming")
    reasons = BACKENDS["cuda"].candidate_not_supported_reasons(cuda, dispatch.resolve("cuda:mma")[1])
    assert torch.cuda.is_available() or reasons


@pytest.mark.parametrize("name, match", [
    ("triton:no-such", "triton has the variants"),
    ("gpu", "expected 'auto', one of"),
    ("cpu:", "expected 'auto', one of"),
])
def test_a_bad_candidate_name_is_refused_with_the_names(name, match):
    with pytest.raises(ValueError, match=match):
        select_backend(name, "auto", problem(), allow_tf32=False)


def test_an_algorithm_that_contradicts_the_candidate_is_refused():
    with pytest.raises(ValueError, match="contradicts backend='cpu:tiled'"):
        select_backend("cpu:tiled", "streaming", problem(), allow_tf32=False)
    with pytest.raises(ValueError, match="contradicts backend='triton:one-pass'"):
        dispatch.resolve("triton:one-pass", "tiled")


def test_candidates_say_whether_they_are_deterministic_and_timed():
    names = {c.name: c for _, c in dispatch.all_candidates()}
    assert not names["triton:one-pass-atomic"].deterministic
    assert names["triton:one-pass"].deterministic and names["cuda:mma"].deterministic
    assert names["triton:default"].timed_on == ("cuda",) and names["cuda:wmma"].timed_on == ("cuda",)
    assert names["cuda:mma"].timed_on == () and names["triton:one-pass"].timed_on == ()
    assert "cpu" in names["cpu:tiled"].timed_on


@pytest.mark.triton_interpret
def test_deterministic_mode_leaves_out_nondeterministic_candidates():
    """torch.use_deterministic_algorithms(True): auto never considers an atomics variant."""
    p = problem("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
    if BACKENDS["triton"].unavailable_reason(p.device):
        pytest.skip(f"triton: {BACKENDS['triton'].unavailable_reason(p.device)}")
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        _, refusals = dispatch.eligible_candidates(p)
        assert any("triton:one-pass-atomic is not deterministic" in r for r in refusals["triton"])
        eligible, _ = dispatch.eligible_candidates(problem())
        assert all(c.deterministic for c in eligible)
    finally:
        torch.use_deterministic_algorithms(previous)
    _, refusals = dispatch.eligible_candidates(p)
    assert not any("not deterministic" in r for r in refusals.get("triton", []))
