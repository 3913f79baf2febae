"""bench/train_study.sh in its reduced CPU mode on fake data, the study's schedule planning and
its calibrated mode, and the loss-backend timing tool (python -m rcl_train.throughput)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_fakes import ROOT, write_fake_fashion

from rcl_train import study, throughput


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    # rho = 100 of 60 images per class: 144 long-tailed images, the smallest classes of 1 image
    return write_fake_fashion(tmp_path_factory.mktemp("fashion"), per_class_train=60, per_class_test=4)


def test_study_script_reduced_cpu_mode(fashion_root, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, STUDY_MODE="cpu", FMNIST_DIR=fashion_root, OUT=str(out),
               STUDY_WORK=str(tmp_path / "work"), PYTHON=sys.executable, STUDY_CPU_EPOCHS="1",
               STUDY_BATCH="48", STUDY_CPU_LIMIT_TEST="30")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "train_study.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "log.txt", "study.json", "study.md"]
    doc = json.loads((out / "study.json").read_text())
    assert doc["epochs"] == 1 and doc["calibration"] is None
    assert [(r["recipe"], r["seed"]) for r in doc["runs"]] == [
        (recipe, seed) for seed in (0, 1, 2) for recipe in ("LA-CE", "BCL", "BCL+RCL")]
    assert all(r["complete"] and len(r["history"]) == 1 for r in doc["runs"])
    for recipe, row in doc["table"].items():
        assert row["seeds"] == [0, 1, 2]
        accs = [r["balanced_accuracy"] for r in doc["runs"] if r["recipe"] == recipe]
        assert row["balanced_accuracy"]["mean"] == pytest.approx(sum(accs) / 3)
        assert row["balanced_accuracy"]["std"] is not None
    md = (out / "study.md").read_text()
    for recipe in ("| LA-CE | 3 |", "| BCL | 3 |", "| BCL+RCL | 3 |"):
        assert recipe in md
    assert "--limit-train 1500" in md and "--device cpu" in md
    assert (out / "curves.png").stat().st_size > 0


def test_plan_epochs():
    # 400 s, 9 runs at once (one wave), 20 s start-up, 3 s per epoch: (400 - 20) / 3 = 126 -> 100
    assert study.plan_epochs(400, 3.0, 20, 1, 100) == 100
    assert study.plan_epochs(400, 5.0, 20, 1, 100) == 76
    assert study.plan_epochs(400, 5.0, 20, 2, 100) == 36  # two waves: 200 s each
    assert study.plan_epochs(10, 5.0, 20, 1, 100) == 1  # never below one epoch


def test_study_calibrated_schedule(fashion_root, tmp_path):
    """--epochs auto: the calibration runs take two epochs each, and the chosen schedule
    fits the budget by the measured times (here the target caps it)."""
    args = ["--out", str(tmp_path / "out"), "--epochs", "auto", "--budget-s", "600",
            "--target-epochs", "2", "--seeds", "0", "--", "--dataset", "fmnist-lt",
            "--data-root", fashion_root, "--device", "cpu", "--threads", "1", "--batch-size", "48",
            "--limit-test", "30"]
    assert study.main(args) == 0
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    cal = doc["calibration"]
    assert cal["steps"] == 2 * (144 // 48) and len(cal["per_epoch_s"]) == 3
    assert cal["epoch_s"] == pytest.approx(sum(cal["per_epoch_s"]))  # one run after another
    assert doc["epochs"] == cal["epochs"] == study.plan_epochs(
        cal["budget_left_s"], cal["epoch_s"], cal["start_s"], cal["waves"], 2) == 2
    for recipe in study.RECIPES:
        calib = tmp_path / "out" / "runs" / "calibrate" / f"{study.slug(recipe)}_s0"
        assert len((calib / "metrics.jsonl").read_text().splitlines()) == 2
    assert "Schedule chosen by measurement" in (tmp_path / "out" / "study.md").read_text()


def test_study_parallel_runs_in_processes(fashion_root, tmp_path):
    args = ["--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "0", "--parallel", "3",
            "--", "--dataset", "fmnist-lt", "--data-root", fashion_root, "--device", "cpu",
            "--threads", "1", "--batch-size", "48", "--limit-test", "30"]
    assert study.main(args) == 0
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["exit"] for r in doc["runs"]] == [0, 0, 0]
    for r in doc["runs"]:  # each ran in its own process, with its log
        assert "== rcl-train report" in (tmp_path / "out" / "runs" / f"{study.slug(r['recipe'])}_s0"
                                         / "log.txt").read_text()


def test_throughput_tool(fashion_root, tmp_path, capsys):
    assert throughput.main(["--backends", "reference,auto", "--batch-sizes", "16,max", "--steps", "2",
                            "--warmup", "1", "--out", str(tmp_path), "--", "--dataset", "fmnist-lt",
                            "--data-root", fashion_root, "--device", "cpu", "--threads", "1",
                            "--loss", "rcl"]) == 0
    doc = json.loads((tmp_path / "throughput.json").read_text())
    rows = doc["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("reference", 16), ("reference", 144), ("auto", 16), ("auto", 144)]
    for r in rows:
        assert r["step_ms"] > 0 and set(r["split_ms"]) == {"data", "model", "loss", "optim"}
        assert sum(r["split_ms"].values()) <= r["step_ms"] * 1.01
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1000)
        assert r["peak_mb"] is None  # CPU
    md = (tmp_path / "throughput.md").read_text()
    assert "| reference | 144 (max) |" in md and "| auto | 16 |" in md
    assert md.strip() in capsys.readouterr().out


def test_throughput_frees_an_out_of_memory_run_before_emptying_the_cache(fashion_root, tmp_path,
                                                                         monkeypatch):
    """The cache is emptied once the failed run's tensors are gone: inside the except clause the
    exception's traceback still holds the run's frames (its Trainer, its activations)."""
    import weakref

    import torch

    alive_at_empty_cache = []
    refs = []

    def oom_measure(argv, data, steps, warmup):
        activations = torch.empty(1000)
        refs.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(throughput, "measure", oom_measure)
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: alive_at_empty_cache.append(refs[-1]() is not None))
    rows, _ = throughput.run(["reference"], [16, "max"], 1, 0,
                             ["--dataset", "fmnist-lt", "--data-root", fashion_root,
                              "--device", "cpu"], str(tmp_path), log=lambda *a: None)
    assert [(r["batch"], r["error"]) for r in rows] == [(16, "out of memory"), (1, "out of memory")]
    assert alive_at_empty_cache and not any(alive_at_empty_cache)


def test_throughput_peak_memory_is_that_of_the_timed_steps(monkeypatch):
    """The peak counter is reset after the warm-up steps (Triton's autotuning and cuDNN's
    algorithm search allocate there), so peak MB is the timed steps' own, as documented."""
    from types import SimpleNamespace

    import torch

    events = []

    class FakeCudaTrainer:
        def __init__(self, cfg, log, data):
            self.device, self.train_y, self.batch_size = torch.device("cuda"), torch.zeros(8), 4
            self.timer, self.amp_dtype = SimpleNamespace(collect=dict), None

        def train_step(self, idx):
            events.append("step")

    monkeypatch.setattr(throughput, "Trainer", FakeCudaTrainer)
    monkeypatch.setattr(throughput, "epoch_order",
                        lambda n, seed, epoch: SimpleNamespace(to=lambda device: torch.arange(n)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake")
    row = throughput.measure(["--device", "cpu"], None, steps=2, warmup=3)
    assert events == ["step"] * 3 + ["reset"] + ["step"] * 2
    assert row["peak_mb"] == 1.0 and row["device"] == "fake"


def test_study_passes_loss_only_flags_to_their_recipes():
    """--tail-margin and --feature-scale reach BCL+RCL alone: rcl-train refuses them with --loss
    none or bcl, so the whole study failed."""
    from types import SimpleNamespace

    from rcl_train.config import parse_config

    flags = ["--data-root", "D", "--tail-margin", "0.1", "--feature-scale=2", "--lr", "0.05"]
    s = study.Study(SimpleNamespace(work_dir="w", out="o", seeds=[0]), flags)
    for recipe in study.RECIPES:
        argv = s.argv(recipe, 0, 1, "out")
        cfg = parse_config(argv)  # a flag that does not apply would exit 2 here
        rcl = recipe == "BCL+RCL"
        assert (cfg.tail_margin, cfg.feature_scale) == ((0.1, 2.0) if rcl else (0.0, None)), recipe
        assert cfg.lr == 0.05 and cfg.data_root == "D"
    assert study.flags_for("BCL", ["--tail-margin", "0.1", "--seed", "3"]) == ["--seed", "3"]


@pytest.mark.parametrize("argv,needle", [
    (["--budget-s", "nan"], "argument --budget-s: expected a finite number > 0.0, got nan"),
    (["--budget-s", "-5"], "argument --budget-s: expected a finite number > 0.0, got -5"),
    (["--target-epochs", "0"], "argument --target-epochs: expected an integer >= 1, got 0"),
    (["--seeds", "0", str(2**70)], "argument --seeds: expected an integer 0..4294967295"),
    (["--parallel", "0"], "argument --parallel: expected an integer >= 1, got 0"),
])
def test_study_bad_flags(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path / "o"), "--epochs", "auto", "--budget-s", "60", *argv,
                    "--", "--data-root", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_study_missing_data_is_a_clear_error(tmp_path, capsys):
    assert study.main(["--out", str(tmp_path / "o"), "--epochs", "auto", "--budget-s", "60", "--",
                       "--data-root", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m rcl_train.study: error: Fashion-MNIST not found"), err


@pytest.mark.parametrize("argv,needle", [
    (["--backends", ""], "argument --backends: expected a comma-separated list, got ''"),
    (["--batch-sizes", ","], "argument --batch-sizes: expected a comma-separated list, got ','"),
    (["--backends", "reference,metal"], "argument --backends: unknown backend 'metal'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
])
def test_throughput_bad_flags(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        throughput.main([*argv, "--out", str(tmp_path), "--", "--data-root", str(tmp_path)])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_throughput_errors_are_one_line(fashion_root, tmp_path, monkeypatch, capsys):
    """Missing data and --out a file: an error line and exit 2; a diverging run: a row that says
    so and exit 1. No traceback."""
    from rcl_train.errors import NonFiniteError

    prog = "python -m rcl_train.throughput: error: "
    assert throughput.main(["--out", str(tmp_path / "o"), "--", "--data-root", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith(prog + "Fashion-MNIST not found")
    (tmp_path / "f").write_text("x")
    assert throughput.main(["--out", str(tmp_path / "f"), "--", "--data-root", fashion_root]) == 2
    assert capsys.readouterr().err == f"{prog}--out {tmp_path / 'f'}: an existing file, not a directory\n"

    def diverging(argv, data, steps, warmup):
        raise NonFiniteError("non-finite loss at step 2 (epoch 1, lr 0.1)")

    monkeypatch.setattr(throughput, "measure", diverging)
    assert throughput.main(["--backends", "reference", "--batch-sizes", "16", "--out",
                            str(tmp_path / "o"), "--", "--data-root", fashion_root,
                            "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "| reference | 16 | diverged: non-finite loss at step 2" in out


@pytest.mark.parametrize("module", [study, throughput])
def test_tool_help_says_where_other_flags_go(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Any other flag (after an optional --) goes to every rcl-train run" in out
    assert "(default: " in out
