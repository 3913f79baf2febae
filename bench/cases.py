"""The implementations the bench times, their inputs, and the work they do (public API only).

An implementation is written `backend[:algorithm|:variant][{NAME=value,...}]`:
  backend    auto, reference, cpu, cuda, triton: rk.contrastive_loss's backends, called through the
             preset (rk.bcl_loss, rk.supcon_loss, rk.rcl_loss);
             reference_compile: the reference call under torch.compile;
             flash_sdpa: PyTorch flash attention with q = Z [1,1,N,d], k = v = K [1,1,M,d], bf16,
             the physical-limit proxy (our op does 4 of attention's 7 matrix products), GPU only;
             gemm_floor: the three plain GEMMs of the tiled algorithm in the case's dtype,
             S = Z·Kᵀ forward, dZ = P·K and dK = Pᵀ·Z backward (autograd of one mm), the floor
             that the tiled algorithm is measured against;
             pml_supcon (pytorch-metric-learning SupConLoss, M = N) and infcl (Inf-CL
             cal_inf_loss), peers where installed.
  :algorithm "auto", "streaming" or "tiled", passed as algorithm= to the rk call; without it the
             call has no algorithm= at all, so the same case runs on an API that lacks it.
  :variant   any other name is one candidate, passed whole as backend=, e.g. `triton:one-pass`,
             `cuda:mma` (names: python -m rcl_kernels.info).
  {...}      environment variables of the case's subprocess, e.g. `auto{RCL_KERNELS_AUTOTUNE=0}`.
             Quote it in a shell: braces with a comma are brace-expanded.

Inputs follow the protocol of the first GPU run (2026-11-26, docs/gpu-status.md): features
[N/2, 2, d] L2-normalized (two views; one view when N is odd), labels long-tailed over C classes
(class k drawn with probability proportional to imbalance^(-k/(C-1)), imbalance 100 by default; 1
is uniform), centers [C, d] L2-normalized, temperature 0.1.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

RK_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
BASELINES = ("reference_compile", "flash_sdpa", "gemm_floor")
PEERS = {"pml_supcon": "pytorch_metric_learning", "infcl": "inf_cl"}
KNOWN = RK_BACKENDS + BASELINES + tuple(PEERS)
PRESETS = ("bcl", "supcon", "rcl")
MODES = ("fwd", "bwd", "fwdbwd")
# Device types each implementation runs on (triton on the CPU would only run interpreted).
DEVICES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",), "flash_sdpa": ("cuda",),
           "infcl": ("cuda",)}
# Implementations that build N x M matrices, skipped above the memory budget.
MATERIALIZING = ("reference", "reference_compile", "pml_supcon", "gemm_floor")
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
TEMPERATURE = 0.1

_IMPL = re.compile(r"^(?P<backend>[a-z_]+)(?::(?P<algorithm>[a-z0-9_-]+))?(?:\{(?P<env>[^{}]*)\})?$")
ALGORITHMS = ("auto", "streaming", "tiled")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Impl:
    backend: str
    algorithm: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        text = self.backend + (f":{self.algorithm}" if self.algorithm else "")
        if self.env:
            text += "{" + ",".join(f"{k}={v}" for k, v in self.env) + "}"
        return text


def parse_env(items, what: str = "--env") -> tuple[tuple[str, str], ...]:
    """['A=1', 'B=x'] -> (('A', '1'), ('B', 'x')); a bad item raises naming `what`."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ValueError(f"{what}: expected NAME=value with NAME a variable name, got {item!r}")
        pairs.append((name, value))
    return tuple(pairs)


def parse_impl(text: str) -> Impl:
    """'cuda:tiled{A=1,B=2}' -> Impl('cuda', 'tiled', (('A', '1'), ('B', '2'))); 'triton:one-pass'
    -> Impl('triton', 'one-pass') (a variant where an algorithm would stand)."""
    match = _IMPL.match(text.strip())
    if not match:
        raise ValueError("--backends: expected backend[:algorithm|:variant][{NAME=value,...}], "
                         f"got {text!r}")
    backend, algorithm = match["backend"], match["algorithm"]
    if backend not in KNOWN:
        raise ValueError(f"--backends: unknown backend {backend!r} in {text!r}; known: "
                         + ", ".join(KNOWN))
    if algorithm and backend not in RK_BACKENDS:
        raise ValueError(f"--backends: {text!r}: an algorithm applies to the rk backends "
                         f"({', '.join(RK_BACKENDS)}), not to {backend}")
    env = match["env"]
    items = [part for part in (env or "").split(",") if part.strip()]
    return Impl(backend, algorithm, parse_env([p.strip() for p in items], f"--backends {text!r}"))


def split_list(values) -> list[str]:
    """['a,b c', 'd{X=1,Y=2}'] -> ['a', 'b', 'c', 'd{X=1,Y=2}']: commas and spaces separate items
    except inside braces."""
    out = []
    for value in values or []:
        out.extend(re.findall(r"(?:\{[^{}]*\}|[^,\s{])+", str(value)))
    return out


def parse_shapes(items) -> list[tuple[int, int, int]]:
    """['4096:128:1000', ...] -> [(N, d, C)]; a bad item raises ValueError naming --shapes."""
    shapes = []
    for item in split_list(items):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: expected N:d:C with positive integers, got {item!r}")
        shapes.append(tuple(map(int, parts)))
    return shapes


def columns_for(preset: str, backend: str, n: int, c: int) -> int:
    """M, the number of columns each anchor is contrasted with."""
    if backend == "pml_supcon" or preset == "supcon":
        return n
    return n + c


def flop_count(backend: str, mode: str, n: int, m: int, d: int) -> tuple[int, str]:
    """Useful flops of one call, so TFLOP/s compare across implementations. Ours (DESIGN §8,
    the streaming count): forward 2·N·M·d (one product), backward 6·N·M·d (recompute + two
    products), together 8·N·M·d. flash_sdpa counts attention's: 4, 10, 14·N·M·d; gemm_floor its
    own: 2, 4, 6·N·M·d."""
    per = {"flash_sdpa": {"fwd": 4, "bwd": 10, "fwdbwd": 14},
           "gemm_floor": {"fwd": 2, "bwd": 4, "fwdbwd": 6}}.get(
               backend, {"fwd": 2, "bwd": 6, "fwdbwd": 8})[mode]
    prefix = {"flash_sdpa": "attention: ", "gemm_floor": "GEMMs: "}.get(backend, "")
    return per * n * m * d, f"{prefix}{per}*N*M*d"


def skip_reason(impl: Impl, device: str, n: int, m: int, dtype: str, budget_gb: float,
                available: dict) -> str | None:
    """Why an implementation is not run on this device and size, or None. `available` is
    rk.available_backends()."""
    backend = impl.backend
    if device not in DEVICES.get(backend, ("cpu", "cuda")):
        return f"{backend} runs on {'/'.join(DEVICES[backend])} only"
    if available.get(backend):
        return f"backend unavailable: {available[backend]}"
    if backend == "reference_compile" and device == "cpu" and not (
            shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on the CPU needs a C++ compiler (none on PATH)"
    if backend in PEERS and importlib.util.find_spec(PEERS[backend]) is None:
        return f"{PEERS[backend]} is not installed"
    if backend in MATERIALIZING:
        need = 6 * n * m * ELEM_BYTES[dtype] / 2**30
        if need > budget_gb:
            return (f"N x M matrices: estimated {need:.1f} GB (6*N*M*{ELEM_BYTES[dtype]} B) "
                    f"exceeds the memory budget {budget_gb:.1f} GB")
    return None


@dataclass
class Case:
    """One implementation on one set of inputs. forward() returns the output with its autograd
    graph; backward(out) the gradients of the leaves."""

    forward: Callable
    leaves: tuple
    grad_output: object = None

    def backward(self, out, retain_graph: bool = False):
        import torch

        return torch.autograd.grad(out, self.leaves, self.grad_output, retain_graph=retain_graph)

    def timed(self, mode: str) -> Callable[[], object]:
        """The call a mode times. "fwd" runs with gradients enabled (it saves what the backward
        needs); "bwd" runs one forward now and repeats the backward on its kept graph."""
        if mode == "fwd":
            return self.forward
        if mode == "fwdbwd":
            return lambda: self.backward(self.forward())
        if mode == "bwd":
            out = self.forward()
            return lambda: self.backward(out, retain_graph=True)
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def long_tailed_prior(c: int, imbalance: float):
    import torch

    return imbalance ** (-torch.arange(c, dtype=torch.float64) / max(1, c - 1))


def build(impl: Impl, preset: str, n: int, d: int, c: int, dtype: str, device: str, seed: int = 0,
          imbalance: float = 100.0) -> Case:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    if impl.backend == "flash_sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        m = columns_for(preset, impl.backend, n, c)
        q = F.normalize(torch.randn(1, 1, n, d, generator=gen), dim=-1)
        kv = F.normalize(torch.randn(1, 1, m, d, generator=gen), dim=-1)
        q, kv = (t.to(device, torch.bfloat16).requires_grad_() for t in (q, kv))
        grad_out = torch.randn(1, 1, n, d, generator=gen).to(device, torch.bfloat16)

        def attention():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kv, kv)

        return Case(attention, (q, kv), grad_out)

    if impl.backend == "gemm_floor":
        m = columns_for(preset, impl.backend, n, c)
        z = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
        k = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
        z, k = (t.to(device, getattr(torch, dtype)).requires_grad_() for t in (z, k))
        # A row-stochastic P, as the tiled algorithm's probabilities are.
        p = torch.softmax(torch.randn(n, m, generator=gen), dim=1).to(device, z.dtype)
        return Case(lambda: z @ k.t(), (z, k), p)

    views = 2 if n % 2 == 0 else 1
    b = n // views
    prior = long_tailed_prior(c, imbalance)
    labels = torch.multinomial(prior, b, replacement=True, generator=gen).to(device)
    tensor_dtype = getattr(torch, dtype)
    feats = F.normalize(torch.randn(b, views, d, generator=gen), dim=-1)
    centers = F.normalize(torch.randn(c, d, generator=gen), dim=-1)
    feats = feats.to(device, tensor_dtype).requires_grad_()
    centers = centers.to(device, tensor_dtype).requires_grad_()

    if impl.backend == "pml_supcon":
        from pytorch_metric_learning.losses import SupConLoss

        loss_fn = SupConLoss(temperature=TEMPERATURE)
        flat_labels = labels.repeat(views)  # view-major, as the rk presets flatten
        return Case(lambda: loss_fn(feats.transpose(0, 1).reshape(n, d), flat_labels), (feats,))
    if impl.backend == "infcl":
        from inf_cl import cal_inf_loss

        def infcl():
            z = feats.transpose(0, 1).reshape(n, d)
            k = torch.cat([z, centers]) if preset != "supcon" else z
            return cal_inf_loss(z, k, scale=1.0 / TEMPERATURE).mean()

        return Case(infcl, (feats, centers))

    import rcl_kernels as rk

    kw = {"backend": "reference" if impl.backend == "reference_compile" else impl.backend}
    if impl.algorithm in ALGORITHMS:
        kw["algorithm"] = impl.algorithm
    elif impl.algorithm:  # one candidate, named whole
        kw["backend"] = f"{impl.backend}:{impl.algorithm}"
    if preset == "bcl":
        def call(f, y, p):
            return rk.bcl_loss(f, y, p, temperature=TEMPERATURE, **kw)
        args, leaves = (feats, labels, centers), (feats, centers)
    elif preset == "supcon":
        def call(f, y):
            return rk.supcon_loss(f, y, temperature=TEMPERATURE, base_temperature=0.07,
                                  num_classes=c, **kw)
        args, leaves = (feats, labels), (feats,)
    elif preset == "rcl":  # on BCL: the long-tailed prior as class counts, a tail margin
        counts = (500 * prior).round().clamp(min=1).to(torch.int64)

        def call(f, y, p):
            return rk.rcl_loss(f, y, p, counts, temperature=TEMPERATURE, feature_scale=1.2,
                               tail_margin=0.1, **kw)
        args, leaves = (feats, labels, centers), (feats, centers)
    else:
        raise ValueError(f"--preset: expected one of {PRESETS}, got {preset!r}")
    if impl.backend == "reference_compile":
        call = torch.compile(call, dynamic=False)
    return Case(lambda: call(*args), leaves)
