"""rcl-train's fast path, on the CPU with its switches forced (and on a GPU where one is present):
the per-step time split and throughput in metrics.jsonl and report.json, bf16 autocast with the
loss outside it in the features' dtype, channels_last, torch.compile, the training set held on
the device, and LA-CE alone augmenting only the view it uses."""

from __future__ import annotations

import json
import time

import pytest
import torch
from train_fakes import tiny_args, write_fake_fashion

from rcl_train.augment import ThreeViewAugment
from rcl_train.cli import main
from rcl_train.config import parse_config
from rcl_train.losses import Objective
from rcl_train.train import Trainer


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=24, per_class_test=3)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_step_split_and_throughput_are_reported(fashion_root, tmp_path):
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "rcl", "--loss-backend", "reference")) == 0
    history = rows(tmp_path)
    for row in history:
        split = row["step_ms"]
        assert set(split) == {"data", "model", "loss", "optim"} and min(split.values()) > 0, split
        # the phases cover each step: together at most the epoch's time (6 steps)
        assert sum(split.values()) * 6 <= 1000 * row["epoch_time_s"]
        assert row["images_per_s"] == pytest.approx(6 * 16 / row["epoch_time_s"])
        assert row["eval_time_s"] > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    total = sum(r["epoch_time_s"] for r in history)
    assert rep["images_per_s"] == pytest.approx(2 * 6 * 16 / total)
    for k in ("data", "model", "loss", "optim"):
        assert rep["step_ms"][k] == pytest.approx(sum(r["step_ms"][k] for r in history) / 2)


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


def test_step_split_attributes_each_phase(fashion_root, tmp_path, monkeypatch):
    """Sleeps planted in the augmentation (1 s), the loss's forward (0.5 s) and backward (1 s)
    and the model's backward (0.8 s) land in data, loss and model, each in its own phase (long
    enough to stand out on a loaded machine)."""
    from rcl_train.models import BCLModel

    real_augment, real_objective, real_model = (ThreeViewAugment.forward, Objective.__call__,
                                                BCLModel.forward)

    def slow_augment(self, *args, **kwargs):
        time.sleep(1.0)
        return real_augment(self, *args, **kwargs)

    def slow_objective(self, *args, **kwargs):
        time.sleep(0.5)
        total, parts = real_objective(self, *args, **kwargs)
        return _SlowBackward.apply(total, 1.0), parts

    def slow_model_backward(self, x, with_contrastive=True):
        if not with_contrastive:  # evaluation
            return real_model(self, x, with_contrastive)
        z, logits, centers = real_model(self, x)
        return z, _SlowBackward.apply(logits, 0.8), centers

    monkeypatch.setattr(ThreeViewAugment, "forward", slow_augment)
    monkeypatch.setattr(Objective, "__call__", slow_objective)
    monkeypatch.setattr(BCLModel, "forward", slow_model_backward)
    # one step per epoch: 16 images, batch 16
    assert main(tiny_args(fashion_root, tmp_path, "--limit-train", "16", "--epochs", "1",
                          "--loss", "bcl", "--loss-backend", "reference")) == 0
    (row,) = rows(tmp_path)
    split = row["step_ms"]
    assert 1000 <= split["data"] < 1800, split
    assert 1500 <= split["loss"] < 2300, split
    assert 800 <= split["model"] < 1800 and split["optim"] < 800, split


def _loss_inputs(monkeypatch):
    """Record (features dtype, centers dtype, autocast on?) at each contrastive-loss call."""
    seen = []
    real = Objective.contrastive

    def contrastive(self, features, labels, centers):
        seen.append((features.dtype, centers.dtype, torch.is_autocast_enabled(features.device.type)))
        return real(self, features, labels, centers)

    monkeypatch.setattr(Objective, "contrastive", contrastive)
    return seen


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("off", torch.float32),
                                       ("auto", torch.float32)])  # auto: off on the CPU
def test_amp_and_the_loss_dtype(fashion_root, tmp_path, monkeypatch, amp, dtype):
    seen = _loss_inputs(monkeypatch)
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "rcl", "--loss-backend", "reference",
                          "--amp", amp, "--max-steps", "2")) == 0
    assert seen == [(dtype, dtype, False)] * 2  # the features' dtype, autocast off in the loss
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["autocast"] == ("torch.bfloat16" if dtype == torch.bfloat16 else "off")
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())


def _final_params(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _final_params_at_init(root, out):
    trainer = Trainer(parse_config(tiny_args(root, out)), log=lambda *a, **k: None)
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("flags", [("--channels-last", "on"), ("--compile", "aot_eager")])
def test_channels_last_and_compile_train_the_same_model(fashion_root, tmp_path, flags):
    """Other kernels, same computation: after one step the parameters agree to float32 noise
    (relative norm; this tiny high-lr setup amplifies rounding about 100x per further step)."""
    common = ["--loss", "rcl", "--loss-backend", "reference", "--max-steps", "1"]
    assert main(tiny_args(fashion_root, tmp_path / "plain", *common, "--channels-last", "off")) == 0
    assert main(tiny_args(fashion_root, tmp_path / "fast", *common, *flags)) == 0
    plain, fast = _final_params(tmp_path / "plain"), _final_params(tmp_path / "fast")
    keys = [k for k in plain if plain[k].is_floating_point()]
    start = _final_params_at_init(fashion_root, tmp_path / "init")
    moved = sum(((plain[k] - start[k]).double() ** 2).sum() for k in keys).sqrt()
    diff = sum(((fast[k] - plain[k]).double() ** 2).sum() for k in keys).sqrt()
    assert moved > 0 and diff <= 1e-3 * moved, (diff, moved)


def test_channels_last_model_and_inputs(fashion_root, tmp_path, monkeypatch):
    cfg = parse_config(tiny_args(fashion_root, tmp_path, "--channels-last", "on", "--loss", "bcl",
                                 "--loss-backend", "reference", "--max-steps", "1"))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    conv = trainer.model.encoder.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    real_forward = trainer.model.forward

    def forward(x, *args, **kwargs):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real_forward(x, *args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", forward)
    trainer.run()
    assert seen and all(seen)  # the training step's and the evaluation's inputs


@pytest.mark.parametrize("setting,expected", [("auto", torch.channels_last), ("on", torch.channels_last),
                                              ("off", torch.contiguous_format)])
def test_channels_last_auto_is_on_on_the_cpu(fashion_root, tmp_path, setting, expected):
    """oneDNN's convolutions are faster in channels_last on the CPU too: auto means on."""
    cfg = parse_config(tiny_args(fashion_root, tmp_path, "--channels-last", setting))
    assert Trainer(cfg, log=lambda *a, **k: None).memory_format == expected


def test_lace_alone_augments_only_the_classifier_view():
    from rcl_train.augment import build_augment

    aug = build_augment("fmnist-lt", (1, 28, 28))
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    assert len(aug(x, contrastive=False)) == 1 and len(aug(x)) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_are_the_fast_path(fashion_root, tmp_path, monkeypatch):
    """On CUDA by default: bf16 autocast, channels_last, the training set on the device, no
    DataLoader, bf16 features into the loss."""
    def no_loader(*args, **kwargs):
        raise AssertionError("a DataLoader was built")

    monkeypatch.setattr(torch.utils.data, "DataLoader", no_loader)
    seen = _loss_inputs(monkeypatch)
    args = tiny_args(fashion_root, tmp_path, "--loss", "rcl", "--max-steps", "3")
    args[args.index("--device") + 1] = "cuda"
    cfg = parse_config(args)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert trainer.train_x.is_cuda and trainer.test_x.is_cuda
    assert trainer.memory_format == torch.channels_last and trainer.amp_dtype == torch.bfloat16
    rep = trainer.run()
    assert seen == [(torch.bfloat16, torch.bfloat16, False)] * 3
    assert rep["steps_done"] == 3 and rep["channels_last"]
