"""A loss call with a known number of classes never waits for the GPU: no host-device
synchronization, so a training step can be captured in a CUDA graph and replayed."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_kwargs, backend_param, draw_labels, fresh_generator, random_features

import rcl_kernels as rk

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [
    backend_param("reference", "cuda"),
    backend_param("triton", "cuda"),
    backend_param("cuda:streaming", "cuda"),
    backend_param("cuda:tiled", "cuda"),
]


def cuda_inputs(dtype=torch.bfloat16, batch=256, dim=128, classes=100):
    gen = fresh_generator()
    features = random_features((batch, 2, dim), gen).to("cuda", dtype)
    centers = random_features((classes, dim), gen).to("cuda", dtype)
    labels = draw_labels("longtail", batch, classes, gen).cuda()
    counts = torch.arange(classes, 0, -1, dtype=torch.int64, device="cuda") * 10
    return features, labels, centers, counts


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("preset", ["bcl", "rcl"])
def test_loss_call_makes_no_host_sync(backend, preset):
    features, labels, centers, counts = cuda_inputs()
    features.requires_grad_()
    kwargs = backend_kwargs(backend)
    loss_fn = {
        "bcl": lambda: rk.bcl_loss(features, labels, centers, **kwargs),
        "rcl": lambda: rk.rcl_loss(features, labels, centers, counts, tail_margin=0.1, **kwargs),
    }[preset]
    loss_fn().backward()  # warm-up: autotuning and lazy initialization may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step_replays_in_a_cuda_graph(backend):
    """Forward + backward of a projection and the RCL loss, captured once and replayed on new
    data, gives the gradients of the same step run eagerly."""
    features, labels, centers, counts = cuda_inputs(torch.float32)
    projection = torch.nn.Linear(features.shape[-1], features.shape[-1], device="cuda")
    kwargs = backend_kwargs(backend)
    static_features, static_labels = features.clone(), labels.clone()

    def step():
        projection.zero_grad(set_to_none=False)
        z = torch.nn.functional.normalize(projection(static_features), dim=-1)
        loss = rk.rcl_loss(z, static_labels, centers, counts, **kwargs)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    new_features, new_labels, _, _ = cuda_inputs(torch.float32)
    static_features.copy_(new_features)
    static_labels.copy_(new_labels)
    graph.replay()
    replayed = (static_loss.clone(), projection.weight.grad.clone())
    eager_loss = step()
    torch.testing.assert_close(replayed[0], eager_loss.detach())
    torch.testing.assert_close(replayed[1], projection.weight.grad)
