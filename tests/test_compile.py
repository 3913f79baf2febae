"""torch.compile, torch.export, torch.jit.trace and torch.vmap over the losses.

Every preset on every CPU backend compiles with fullgraph on and off and dynamic shapes on and
off, with and without gradients; a small model plus the RCL loss compiles with fullgraph=True,
dynamic=True over changing batch sizes. Shapes are tiny and each compiled function serves both
gradient modes (and, when dynamic, two batch sizes), so the matrix stays fast.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import backend_kwargs, backend_param, draw_labels, fresh_generator, random_features

import rcl_kernels as rk

PRESETS = {
    "supcon": lambda f, y, c, counts, **kw: rk.supcon_loss(f, y, num_classes=c.shape[0], **kw),
    "bcl": lambda f, y, c, counts, **kw: rk.bcl_loss(f, y, c, **kw),
    "rcl": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, c, counts, **kw),
    "rcl_margin": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, c, counts, tail_margin=0.2,
                                                              feature_scale=1.1, **kw),
    "rcl_standalone": lambda f, y, c, counts, **kw: rk.rcl_loss(f, y, None, counts, **kw),
    "bcl_normalize": lambda f, y, c, counts, **kw: rk.bcl_loss(3 * f, y, 2 * c, normalize=True, **kw),
}
CPU_BACKENDS = [backend_param("reference"), backend_param("cpu:streaming"), backend_param("cpu:tiled")]
COMPILE_MODES = {
    "fullgraph-dynamic": dict(fullgraph=True, dynamic=True),
    "fullgraph-auto": dict(fullgraph=True),
    "dynamic": dict(dynamic=True),
    "auto": dict(),
}
CLASSES, DIM = 6, 16


def problem(batch: int, gen: torch.Generator):
    features = random_features((batch, 2, DIM), gen).float()
    centers = random_features((CLASSES, DIM), gen).float()
    labels = draw_labels("longtail", batch, CLASSES, gen)
    return features, labels, centers


def loss_and_grads(fn, features, labels, centers, counts, grad: bool):
    f, c = features.clone().requires_grad_(grad), centers.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        loss = fn(f, labels, c, counts)
    if not grad:
        return (loss,)
    loss.backward()
    return loss, f.grad, c.grad


def assert_same(traced, eager, name=""):
    for got, expected in zip(traced, eager, strict=True):
        if expected is None:  # no centers gradient (supcon, standalone); compiled: None or zeros
            assert got is None or not got.any(), name
        else:
            torch.testing.assert_close(got, expected, msg=lambda m: f"{name}: {m}")


def every_preset(features, labels, centers, counts, **kwargs):
    """The loss of every preset, so that one compiled function traces them all: with
    fullgraph=True any graph break in any preset fails it."""
    return tuple(preset(features, labels, centers, counts, **kwargs) for preset in PRESETS.values())


def losses_and_grads(fn, features, labels, centers, counts, grad: bool):
    """Each preset's loss and, with grad, its gradients for the features and the centers."""
    f, c = features.clone().requires_grad_(grad), centers.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        losses = fn(f, labels, c, counts)
    if not grad:
        return [(loss,) for loss in losses]
    return [(loss, *torch.autograd.grad(loss, (f, c), retain_graph=True, allow_unused=True))
            for loss in losses]


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
# Each preset's gradient is taken from one graph with retain_graph=True, which a compiled backward
# with donated buffers refuses.
@torch._functorch.config.patch(donated_buffer=False)
def test_every_preset_compiles_on_every_backend(backend, mode):
    gen = fresh_generator()
    counts = torch.arange(CLASSES, 0, -1).double() * 40
    loss_fn = functools.partial(every_preset, **backend_kwargs(backend))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", **COMPILE_MODES[mode])
    # A second batch size under dynamic shapes runs the same graph with another N.
    batches = (12, 7) if COMPILE_MODES[mode].get("dynamic") else (12,)
    for batch in batches:
        inputs = problem(batch, gen)
        for grad in (True, False):
            traced = losses_and_grads(compiled, *inputs, counts, grad)
            eager = losses_and_grads(loss_fn, *inputs, counts, grad)
            for name, got, expected in zip(PRESETS, traced, eager, strict=True):
                assert_same(got, expected, name)


class TinyModel(torch.nn.Module):
    """An encoder, a projection to unit-norm contrastive features and a classifier whose weights,
    projected and normalized, are the class centers (BCL's layout)."""

    def __init__(self, gen: torch.Generator, width: int = 12, dim: int = 8):
        super().__init__()
        self.encoder = torch.nn.Linear(DIM, width)
        self.head = torch.nn.Linear(width, dim)
        self.classifier = torch.nn.Linear(width, CLASSES)
        self.center_head = torch.nn.Linear(width, dim)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)

    def forward(self, images):  # images [B, V, DIM]
        hidden = torch.relu(self.encoder(images))
        features = torch.nn.functional.normalize(self.head(hidden), dim=-1)
        centers = torch.nn.functional.normalize(self.center_head(self.classifier.weight), dim=-1)
        return features, centers, self.classifier(hidden[:, 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_and_rcl_compile_fullgraph_dynamic_over_changing_batch_sizes(backend):
    gen = fresh_generator()
    model = TinyModel(gen)
    counts = [400, 200, 90, 40, 20, 8]
    rcl = rk.RebalancedContrastiveLoss(counts, tail_margin=0.1, feature_scale=1.2, **backend_kwargs(backend))
    la = rk.LogitAdjustedLoss(counts)

    def step(images, labels):
        features, centers, logits = model(images)
        return la(logits, labels) + rcl(features, labels, centers)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (8, 12, 5, 16):
        images = torch.randn(batch, 2, DIM, generator=gen)
        labels = draw_labels("longtail", batch, CLASSES, gen)
        results = []
        for fn in (step, compiled):
            model.zero_grad()
            loss = fn(images, labels)
            loss.backward()
            results.append((loss.detach(), *(p.grad.clone() for p in model.parameters())))
        assert_same(results[1], results[0])


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks"])
def test_symbolic_float_arguments(fullgraph):
    """Temperature, feature scale and margin as inputs of a dynamic compiled function, with floats
    left symbolic: the argument checks compare them (guards) instead of reading them."""
    gen = fresh_generator()
    features, labels, centers = problem(16, gen)

    def step(f, temperature, scale, margin):
        return rk.rcl_loss(f, labels, centers, [5, 4, 3, 2, 2, 1], temperature=temperature,
                           feature_scale=scale, tail_margin=margin, backend="cpu")

    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=False):
        compiled = torch.compile(step, dynamic=True, fullgraph=fullgraph, backend="aot_eager")
        for temperature, margin in ((0.1, 0.1), (0.3, 0.2)):
            torch.testing.assert_close(compiled(features, temperature, 1.1, margin),
                                       step(features, temperature, 1.1, margin))


@pytest.mark.slow
def test_inductor_fullgraph():
    gen = fresh_generator()
    features, labels, centers = problem(32, gen)
    counts = torch.arange(CLASSES, 0, -1).double() * 30
    step = functools.partial(PRESETS["rcl_margin"], backend="cpu", algorithm="tiled")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    assert_same(loss_and_grads(compiled, features, labels, centers, counts, True),
                loss_and_grads(step, features, labels, centers, counts, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_export(backend):
    gen = fresh_generator()
    features, labels, centers = problem(8, gen)
    module = rk.RebalancedContrastiveLoss([40, 30, 20, 10, 5, 1], tail_margin=0.1, **backend_kwargs(backend))
    exported = torch.export.export(module, (features, labels, centers))
    torch.testing.assert_close(exported.module()(features, labels, centers), module(features, labels, centers))


JIT_TRACE_CASES = {
    "rcl_module": lambda f, y, c: (rk.RebalancedContrastiveLoss([40, 30, 20, 10, 5, 1]), (f, y, c)),
    "supcon": lambda f, y, c: (lambda x, t: rk.supcon_loss(x, t), (f, y)),
    "bcl_module": lambda f, y, c: (rk.BalancedContrastiveLoss(), (f, y, c)),
}


@pytest.mark.parametrize("case", JIT_TRACE_CASES)
def test_jit_trace_is_refused_with_a_pointer_to_compile_and_export(case):
    features, labels, centers = problem(8, fresh_generator())
    fn, inputs = JIT_TRACE_CASES[case](features, labels, centers)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.compile.*torch\.export"):
        torch.jit.trace(fn, inputs, check_trace=False)


@pytest.mark.parametrize("backend", [backend_param("cpu:streaming"), backend_param("cpu:tiled")])
@pytest.mark.parametrize("grad", [False, True], ids=["loss", "grad"])
def test_vmap_over_a_fused_backend_points_to_the_reference(backend, grad):
    features = torch.stack([problem(8, fresh_generator())[0] for _ in range(3)])
    labels, centers = problem(8, fresh_generator())[1:]

    def loss(spec):
        fn = lambda f: rk.bcl_loss(f, labels, centers, **backend_kwargs(spec))  # noqa: E731
        return torch.vmap(torch.func.grad(fn) if grad else fn)

    expected = torch.stack([(torch.func.grad if grad else lambda g: g)(
        lambda f: rk.bcl_loss(f, labels, centers, backend="reference"))(f) for f in features])
    torch.testing.assert_close(loss("reference")(features), expected)
    with pytest.raises(RuntimeError, match="vmap.*backend='reference'"):
        loss(backend)(features)


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("mode", ["fullgraph-dynamic", "fullgraph-auto"])
@pytest.mark.parametrize("preset", ["bcl", "rcl_margin"])
@pytest.mark.parametrize("backend", [backend_param("triton", "cuda"),
                                     backend_param("cuda:streaming", "cuda"),
                                     backend_param("cuda:tiled", "cuda")])
def test_gpu_backends_compile(backend, preset, mode, grad):
    """torch.compile(fullgraph=True) through the GPU kernels, static and dynamic, with and
    without gradients."""
    gen = fresh_generator()
    features, labels, centers = (t.cuda() for t in problem(64, gen))
    counts = (torch.arange(CLASSES, 0, -1) * 40).cuda()
    loss_fn = functools.partial(PRESETS[preset], **backend_kwargs(backend))
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, **COMPILE_MODES[mode])
    for traced, eager in zip(loss_and_grads(compiled, features, labels, centers, counts, grad),
                             loss_and_grads(loss_fn, features, labels, centers, counts, grad),
                             strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)
