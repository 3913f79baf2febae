"""rcl-train's failures: a diverging run stops with an error and keeps its last good checkpoint;
corrupt input files and flags give an `rcl-train: error:` line naming the file, not a traceback."""

from __future__ import annotations

import math
import os

import pytest
import torch
from train_fakes import tiny_args, write_fake_fashion

from rcl_train.cli import main
from rcl_train.config import parse_config
from rcl_train.losses import Objective
from rcl_train.train import NonFiniteError, Trainer


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=24, per_class_test=3)


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def poison_objective(monkeypatch, at_call: int, what: str):
    """Make the objective's `at_call`-th call (1-based) give a NaN loss or an infinite gradient."""
    real = Objective.__call__
    calls = []

    def call(self, logits, labels, features=None, centers=None):
        total, parts = real(self, logits, labels, features, centers)
        calls.append(1)
        if len(calls) == at_call:
            if what == "loss":
                total = total * math.nan
                parts["loss"] = total.detach()
            else:
                total = total + _InfGradient.apply(logits.sum() * 0)
        return total, parts

    monkeypatch.setattr(Objective, "__call__", call)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_step_stops_and_keeps_the_checkpoint(fashion_root, tmp_path, monkeypatch,
                                                       capsys, what):
    common = ["--loss", "rcl", "--loss-backend", "reference", "--eval-every", "0"]
    assert main(tiny_args(fashion_root, tmp_path, *common, "--max-steps", "3")) == 0  # saved at step 3
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    poison_objective(monkeypatch, at_call=2, what=what)  # global step 5 of the resumed run
    code = main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path)))
    assert code == 3
    err = capsys.readouterr().err
    assert f"rcl-train: error: non-finite {what} at step 5" in err, err
    assert "stopped before the optimizer step" in err and str(ckpt) in err
    assert ckpt.read_bytes() == before


def test_nonfinite_gradient_never_reaches_the_parameters(fashion_root, tmp_path, monkeypatch):
    poison_objective(monkeypatch, at_call=2, what="gradient")
    cfg = parse_config(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--loss-backend",
                                 "reference", "--eval-every", "0"))
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        trainer.run()
    assert trainer.global_step == 1
    for name, value in trainer.model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert not os.path.exists(trainer.ckpt_path)  # no epoch finished: nothing was ever saved


def test_overflowing_parameters_are_never_saved(fashion_root, tmp_path, monkeypatch, capsys):
    """A finite loss and gradient can still overflow the parameters (a huge learning rate): the
    check before each save refuses such a model."""
    common = ["--loss", "bcl", "--loss-backend", "reference", "--eval-every", "0"]
    assert main(tiny_args(fashion_root, tmp_path, *common, "--max-steps", "3")) == 0
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    real_step = torch.optim.SGD.step
    calls = []

    def overflowing_step(self, *args, **kwargs):  # step 6, the last of epoch 1, overflows
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing_step)
    capsys.readouterr()
    assert main(tiny_args(fashion_root, tmp_path, *common, "--resume", str(tmp_path))) == 3
    err = capsys.readouterr().err
    assert "rcl-train: error: the model has non-finite parameters after step 6: not saved" in err
    assert ckpt.read_bytes() == before

