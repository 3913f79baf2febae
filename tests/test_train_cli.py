"""rcl-train's command line: every flag's help gives its default, and --tensorboard DIR writes
the training curves as TensorBoard scalars."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from train_fakes import tiny_args, write_fake_fashion

import rcl_kernels as rk
from rcl_train.cli import main
from rcl_train.config import build_parser


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=24, per_class_test=3)


def _flag_help():
    """({--flag: its formatted help text on one line}, the parser)."""
    parser = build_parser()
    formatter = parser._get_formatter()
    return {a.option_strings[-1]: " ".join(formatter._expand_help(a).split())
            for a in parser._actions if a.option_strings and a.dest != "help"}, parser


def test_every_flag_gives_its_default():
    helps, parser = _flag_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[-1]
        text = helps[flag]
        if action.default is None or isinstance(action.default, bool):
            assert "default: " in text and "(default: None)" not in text, (flag, text)
            assert "(default: True)" not in text and "(default: False)" not in text, (flag, text)
        else:
            assert text.endswith(f"(default: {action.default})"), (flag, text)
    assert helps["--no-progress"] == "no progress bar (default: a progress bar)"


def test_feature_scale_help_gives_the_library_default():
    helps, _ = _flag_help()
    default = inspect.signature(rk.rcl_loss).parameters["feature_scale"].default
    assert f"(default: rcl_kernels.rcl_loss's own, {default})" in helps["--feature-scale"]


def _scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars(fashion_root, tmp_path):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    assert main(tiny_args(fashion_root, tmp_path / "out", "--loss", "rcl", "--loss-backend",
                          "reference", "--tensorboard", str(tb))) == 0
    scalars = _scalars(tb)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))  # 2 epochs of 6 steps
    assert {"train/ce", "train/con", "train/lr", "epoch/step_ms/loss"} <= set(scalars)
    for key in ("loss", "test_balanced_accuracy", "images_per_s"):
        assert [s for s, _ in scalars[f"epoch/{key}"]] == [6, 12]
        assert [v for _, v in scalars[f"epoch/{key}"]] == pytest.approx(
            [r[key] for r in rows], rel=1e-6), key


def test_tensorboard_missing_package_is_a_clear_error(fashion_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert main(tiny_args(fashion_root, tmp_path, "--tensorboard", str(tmp_path / "tb"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcl-train: error: --tensorboard needs the tensorboard package: "
                          "pip install tensorboard"), err
