"""rcl_train end to end on tiny fake data: a two-step run per loss, exact resume, the report and
the CLI's errors for missing data and bad flags."""

from __future__ import annotations

import json
import os

import pytest
import torch
from train_fakes import tiny_args, write_fake_cifar, write_fake_fashion

import rcl_kernels as rk
from rcl_train.cli import main
from rcl_train.config import parse_config


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=24, per_class_test=3)


def final_params(out):
    ck = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    return ck


@pytest.mark.parametrize("loss", ["none", "supcon", "bcl", "rcl"])
def test_two_step_smoke(fashion_root, tmp_path, loss, capsys):
    extra = ["--feature-scale", "1.5", "--tail-margin", "0.1"] if loss == "rcl" else []
    assert main(tiny_args(fashion_root, tmp_path, "--loss", loss, "--loss-backend", "reference",
                          "--max-steps", "2", *extra)) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    for key in ("overall_accuracy", "balanced_accuracy", "many", "medium", "few", "per_class",
                "config", "wall_time_s"):
        assert key in rep
    assert rep["steps_done"] == 2 and rep["config"]["loss"] == loss
    assert len(rep["per_class"]) == 10 and 0.0 <= rep["balanced_accuracy"] <= 1.0
    assert "balanced accuracy" in capsys.readouterr().out
    ck = final_params(tmp_path)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_full_run_writes_metrics_and_plots(fashion_root, tmp_path, capsys):
    args = tiny_args(fashion_root, tmp_path, "--loss", "rcl", "--loss-backend", "auto")
    args.remove("--no-plots")
    assert main(args) == 0
    assert (f"report: {tmp_path}/report.json (curves.png, confusion.png, metrics.jsonl, "
            "checkpoint.pt)") in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all("test_balanced_accuracy" in r and r["lr"] > 0 and "con" in r for r in rows)
    for name in ("report.json", "curves.png", "confusion.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["epochs_done"] == 2 and not rep["stopped_early"]
    assert rep["class_counts"][0] == 24 and rep["class_counts"][-1] == 3


@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch (6 steps per epoch) and at the boundary
def test_resume_matches_uninterrupted(fashion_root, tmp_path, stop_at):
    common = ["--loss", "rcl", "--loss-backend", "reference", "--eval-every", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(tiny_args(fashion_root, full, *common, "--max-steps", "8")) == 0
    assert main(tiny_args(fashion_root, part, *common, "--max-steps", str(stop_at))) == 0
    assert final_params(part)["global_step"] == stop_at
    assert main(tiny_args(fashion_root, part, *common, "--max-steps", "8", "--resume", str(part))) == 0
    a, b = final_params(full), final_params(part)
    assert a["global_step"] == b["global_step"] == 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=0, atol=0)
    # the first epoch's metrics row covers all its 6 steps, also when stopped and resumed within it
    row_a, row_b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (full, part))
    for key in ("loss", "ce", "con", "lr"):
        assert row_a[key] == row_b[key], key
    assert not row_b["resumed_mid_epoch"] and row_b["images_per_s"] > 0
    assert set(row_b["step_ms"]) == {"data", "model", "loss", "optim"}


def test_no_plots_names_only_the_files_written(fashion_root, tmp_path, capsys):
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "none", "--max-steps", "1")) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path}/report.json (metrics.jsonl, checkpoint.pt)" in out
    assert ".png" not in out and not list(tmp_path.glob("*.png"))


def test_resume_refuses_other_settings(fashion_root, tmp_path, capsys):
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--max-steps", "1",
                          "--loss-backend", "reference")) == 0
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "rcl", "--resume", str(tmp_path),
                          "--loss-backend", "reference")) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(tiny_args(fashion_root, tmp_path / "x", "--resume", str(tmp_path / "nope"))) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cifar_run(tmp_path):
    write_fake_cifar(tmp_path / "data", num_classes=10, per_class_train=12, per_class_test=2)
    assert main(["--dataset", "cifar10-lt", "--data-root", str(tmp_path / "data"), "--arch", "resnet8",
                 "--imbalance", "4", "--batch-size", "16", "--epochs", "1", "--max-steps", "2",
                 "--loss", "bcl", "--loss-backend", "reference", "--threads", "1", "--no-progress",
                 "--no-plots", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["arch"] == "resnet8" and rep["class_counts"][0] == 12


def test_bcl_cifar100_recipe(tmp_path):
    """--recipe bcl-cifar100: BCL's CIFAR-100-LT settings (config.RECIPES cites each), any flag
    given overrides one, and it trains on CIFAR-100 pickles in the real format."""
    write_fake_cifar(tmp_path / "data", num_classes=100, per_class_train=4, per_class_test=1)
    data = ["--data-root", str(tmp_path / "data")]
    cfg = parse_config(["--recipe", "bcl-cifar100", *data])
    bcl = dict(dataset="cifar100-lt", imbalance=100.0, arch="resnet32", loss="bcl", epochs=200,
               batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=5.0,
               alpha=2.0, beta=0.6, temperature=0.1, feat_dim=128)
    assert {k: getattr(cfg, k) for k in bcl} == bcl and cfg.recipe == "bcl-cifar100"
    cfg = parse_config(["--recipe", "bcl-cifar100", *data, "--loss", "rcl", "--epochs", "3"])
    assert (cfg.loss, cfg.epochs, cfg.arch, cfg.beta) == ("rcl", 3, "resnet32", 0.6)
    assert main(["--recipe", "bcl-cifar100", *data, "--batch-size", "32", "--max-steps", "1",
                 "--loss-backend", "reference", "--device", "cpu", "--threads", "1", "--no-progress",
                 "--no-plots", "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["arch"] == "resnet32" and rep["config"]["recipe"] == "bcl-cifar100"
    assert len(rep["class_counts"]) == 100 and rep["class_counts"][0] == 4


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "apt-get install -y dataset-fashion-mnist" in err
    assert main(["--dataset", "cifar100-lt", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
    assert "cifar-100-python" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--loss", "focal"], "--loss"),
    (["--dataset", "imagenet-lt"], "--dataset"),
    (["--loss-backend", "metal"], "--loss-backend"),
    (["--imbalance", "0.5"], "--imbalance"),
    (["--epochs", "0"], "--epochs"),
    (["--temperature", "0"], "--temperature"),
    (["--lr", "inf"], "--lr"),  # would train "successfully" to a NaN model
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--batch-size", "many"], "--batch-size"),
    (["--device", "tpu"], "--device"),
    (["--recipe", "bcl-imagenet"], "--recipe"),
    (["--dataset", "cifar10-lt"], "--data-root"),
    (["--loss", "bcl", "--feature-scale", "2"], "--feature-scale"),
    (["--loss", "none", "--tail-margin", "0.2"], "--tail-margin"),
    (["--seed", str(2**70)], "argument --seed: expected an integer 0..4294967295"),
    (["--data-seed", str(2**70)], "argument --data-seed: expected an integer 0..4294967295"),
    (["--seed", "-1"], "argument --seed"),
])
def test_bad_flags(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_largest_seeds_run(fashion_root, tmp_path):
    """The largest accepted seeds reach every generator the harness seeds without overflowing (2**70 is refused)."""
    from rcl_train.config import SEED_MAX

    assert main(tiny_args(fashion_root, tmp_path, "--seed", str(SEED_MAX), "--data-seed",
                          str(SEED_MAX), "--limit-train", "60", "--max-steps", "1",
                          "--loss", "none")) == 0


def test_progress_bar_counts_epochs_from_one(fashion_root, tmp_path, monkeypatch):
    """The bar's epoch= agrees with the log's 'epoch 1'."""
    from rcl_train import train as T

    postfixes = []

    class Bar:
        def set_postfix(self, **kw):
            postfixes.append(kw["epoch"])

        def update(self, n):
            pass

        def write(self, s):
            pass

        def close(self):
            pass

    monkeypatch.setattr(T, "_progress_bar", lambda *a, **k: Bar())
    assert main(tiny_args(fashion_root, tmp_path, "--loss", "none", "--max-steps", "7")) == 0
    assert postfixes == [1] * 6 + [2]


def test_unavailable_backend_is_reported(fashion_root, tmp_path, capsys):
    reasons = rk.available_backends()
    missing = [b for b in ("cuda", "triton", "cpu") if reasons.get(b)]
    if not missing:
        pytest.skip("every backend is available here")
    code = main(tiny_args(fashion_root, tmp_path, "--loss", "bcl", "--loss-backend", missing[0],
                          "--max-steps", "1"))
    assert code == 2
    assert missing[0] in capsys.readouterr().err


def test_demo(tmp_path, capsys):
    from rcl_train import demo

    assert demo.main(["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    root = write_fake_fashion(tmp_path / "fm", per_class_train=40, per_class_test=2)
    assert demo.main(["--data-root", root, "--epochs", "1", "--out", str(tmp_path / "o"),
                      "--max-steps", "1", "--batch-size", "16", "--threads", "1", "--no-plots",
                      "--loss-backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "rho=100" in out and "balanced accuracy" in out and "demo: finished" in out
