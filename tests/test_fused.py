"""rcl_kernels.fused: the glue around the kernels. On a GPU every ATen op it runs is a kernel
launch, and at BCL's shapes (N = 512) the launches, not the GEMMs, set the time; so the number of
ops it dispatches is counted here, on the CPU, where the same Python runs."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import draw_labels, fresh_generator, random_features
from torch.utils._python_dispatch import TorchDispatchMode

import rcl_kernels as rk

# Ops that only make a view or read a scalar back: no kernel launch on a GPU.
_NO_LAUNCH = (torch.ops.aten.detach, torch.ops.aten._local_scalar_dense)
# Forward + backward of the BCL preset through the tiled algorithm: validation, class tables, the
# one kernel call, the losses from its positive sums, the non-finite check and the gradient's
# scaling (58 of them; the per-anchor glue with segment sums would need about 90).
MAX_OPS = 64


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in _NO_LAUNCH:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _bcl_step_ops(n: int, d: int, num_classes: int = 10) -> collections.Counter:
    gen = fresh_generator()
    features = random_features((n // 2, 2, d), gen).float().requires_grad_()
    centers = random_features((num_classes, d), gen).float().requires_grad_()
    labels = draw_labels("longtail", n // 2, num_classes, gen)
    step = lambda: torch.autograd.grad(  # noqa: E731
        rk.bcl_loss(features, labels, centers, backend="cpu:tiled"), (features, centers))
    step()  # first call: imports, warnings, caches
    with _OpCounter() as counter:
        step()
    return counter.ops


@pytest.mark.parametrize("n, d", [(64, 32), (512, 256)])
def test_the_tiled_step_dispatches_a_bounded_number_of_ops_whatever_n(n, d):
    ops = _bcl_step_ops(n, d)
    assert ops["rcl_kernels.tiled_loss_forward_backward"] == 1, ops
    assert sum(ops.values()) <= MAX_OPS, sorted(ops.items(), key=lambda item: -item[1])
    # No segment sums or per-chunk loops: the count does not grow with N.
    assert ops == _bcl_step_ops(64, 32)


@pytest.mark.skipif(rk.available_backends()["triton"] is not None,
                    reason="needs the Triton kernels (TRITON_INTERPRET=1 on a CPU)")
@pytest.mark.parametrize("prototypes", [True, False])
def test_the_loss_passes_int32_labels_to_the_triton_ops_only(monkeypatch, prototypes):
    """The Triton ops compare labels in the dtype they get: the loss narrows the validated labels
    to int32 once per forward for them (the backward gets the saved ones), and keeps int64 for
    every other op (the C++ ops take int64 only). The loss does not change."""
    from rcl_kernels.kernels import cpu, cuda, tiled
    from rcl_kernels.kernels.triton import launch

    seen = []

    def recording(name, fn):
        def call(*args, **kwargs):
            labels = args[2:4] if name == "forward" else args[3:5]
            seen.append((name, *(t.dtype for t in labels)))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(launch, "lse_forward", recording("forward", launch.lse_forward))
    monkeypatch.setattr(launch, "lse_backward", recording("backward", launch.lse_backward))
    gen = fresh_generator()
    labels = draw_labels("uniform", 12, 3, gen)
    features = random_features((12, 2, 16), gen).float().requires_grad_()
    centers = random_features((3, 16), gen).float() if prototypes else None
    kwargs = dict(temperature=0.2, class_averaging=prototypes, num_classes=3)
    loss = rk.contrastive_loss(features, labels, centers, backend="triton", **kwargs)
    loss.backward()
    assert seen == [("forward", torch.int32, torch.int32),
                    ("backward", torch.int32, torch.int32)], seen
    expected = rk.contrastive_loss(features.detach(), labels, centers, backend="cpu", **kwargs)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert cpu.STREAMING.label_dtype == torch.int64
    assert tiled.TILED.label_dtype == torch.int64
    assert all(k.label_dtype == torch.int64 for k in cuda.VARIANTS.values())


@pytest.mark.parametrize("prototypes", [True, False])
def test_the_handed_over_gradient_survives_a_retained_graph(prototypes):
    """The mean's backward hands its gradient buffers over as the input gradients (scaled in
    place, or as they are for an upstream gradient of 1). A second backward through the retained
    graph, after the first one's .grad was edited in place (as gradient clipping does), must give
    the same gradient, and a scaled upstream gradient must scale it."""
    gen = fresh_generator()
    features = random_features((48, 2, 16), gen).float().requires_grad_()
    centers = random_features((6, 16), gen).float().requires_grad_() if prototypes else None
    labels = draw_labels("longtail", 48, 6, gen)
    leaves = [t for t in (features, centers) if t is not None]
    loss = rk.contrastive_loss(features, labels, centers, backend="cpu:tiled")
    loss.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad.mul_(-7.0)
        leaf.grad = None
    loss.backward(retain_graph=True)
    for leaf, want in zip(leaves, first):
        assert torch.equal(leaf.grad, want)
    for upstream in (3.0, 1.0):
        got = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(upstream),
                                  retain_graph=True)
        for value, want in zip(got, first):
            torch.testing.assert_close(value, upstream * want, rtol=1e-6, atol=1e-8)
    reference = rk.contrastive_loss(features, labels, centers, backend="reference")
    for value, want in zip(torch.autograd.grad(reference, leaves), first):
        torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-6)
