"""rcl-train data-parallel on 2 CPU processes (gloo) against one process on the same global batch.

* float64 (the harness in float64: default dtype and the augmentation's uint8 -> float conversion
  patched): a full epoch of 4 steps of LA-CE + RCL (tail margins) and of LA-CE + SupCon on 2
  processes ends with the same parameters and BatchNorm statistics as 1 process to 1e-9 (the
  data-parallel run is the same computation, not an approximation), the same test accuracy, and
  the same logged losses to 1e-6 relative (the harness computes LA-CE on float32 logits).
* float32, the real command line under torchrun: runs, rank 0 alone reports, and the parameters
  after 2 steps agree with the single-process run to float32 noise, which this small, high-lr
  setup amplifies quickly (relative norm about 1e-5 after 1 step, 1e-3 after 2; running the
  single process with another CPU thread count alone gives a third of that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import free_ports, spawn_and_wait
from train_fakes import write_fake_fashion

pytest.importorskip("rcl_train")
pytest.importorskip("kornia")

# Fake Fashion-MNIST files in the real format (tests never read data outside the repo); at the
# default rho = 100, 100 images of the head class give 242 long-tailed images, 128 kept.
FAKE = {"per_class_train": 100, "per_class_test": 6}
COMMON = ["--limit-train", "128", "--limit-test", "60", "--batch-size", "32", "--epochs", "1",
          "--no-progress", "--no-plots", "--device", "cpu", "--threads", "1"]
CONFIGS = {"rcl": ["--loss", "rcl", "--tail-margin", "0.2"], "supcon": ["--loss", "supcon"]}
TIMEOUT_S = 240


def _train_float64(rank, world, ports, out_dir, data_root):
    """Run every CONFIGS entry in float64, first on one process (rank 0 alone, without the
    torchrun environment; the other ranks wait in the rendezvous), then as rank `rank` of `world`."""
    torch.set_default_dtype(torch.float64)
    import rcl_train.augment as augment

    augment.to_float = lambda x: x.to(torch.float64).div_(255.0)
    from rcl_train.config import parse_config
    from rcl_train.train import Trainer

    runs = [(name, extra, 1, None) for name, extra in CONFIGS.items()] if rank == 0 else []
    runs += [(name, extra, world, port) for (name, extra), port in zip(CONFIGS.items(), ports)]
    for name, extra, size, port in runs:
        if size > 1:  # what torchrun sets; one port per run (each run inits and destroys a group)
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cfg = parse_config(COMMON + extra + ["--data-root", data_root,
                                             "--out", os.path.join(out_dir, f"{name}-w{size}")])
        trainer = Trainer(cfg, log=lambda *args, **kwargs: None)
        try:
            trainer.run()
            if rank == 0:
                torch.save({"model": trainer.model.state_dict(), "history": trainer.history},
                           os.path.join(out_dir, f"{name}-w{size}.pt"))
        finally:
            if trainer.dist is not None:
                trainer.dist.close()


def test_two_processes_equal_one_process_float64(tmp_path):
    out = str(tmp_path)
    root = write_fake_fashion(tmp_path / "fashion", **FAKE)
    spawn_and_wait(_train_float64, 2, (2, free_ports(len(CONFIGS)), out, root), TIMEOUT_S)
    for name in CONFIGS:
        one = torch.load(os.path.join(out, f"{name}-w1.pt"), weights_only=False)
        two = torch.load(os.path.join(out, f"{name}-w2.pt"), weights_only=False)
        assert one["model"].keys() == two["model"].keys()
        for key, value in one["model"].items():
            if value.is_floating_point():
                diff = (value - two["model"][key]).abs().max().item()
                assert diff <= 1e-9, f"{name}: {key} differs by {diff:.3e}"
            else:
                assert torch.equal(value, two["model"][key]), f"{name}: {key}"
        (row1,), (row2,) = one["history"], two["history"]
        assert row1["step"] == row2["step"] == 4
        for key in ("loss", "ce", "con"):
            # logged values go through LA-CE on float32 logits (the harness casts): float32 noise
            assert abs(row1[key] - row2[key]) <= 1e-6 * max(1.0, abs(row1[key])), (name, key)
        assert row1["test_overall_accuracy"] == row2["test_overall_accuracy"]


def _checkpoint_params(directory):
    state = torch.load(os.path.join(directory, "checkpoint.pt"), weights_only=False)
    params = {k: v.double() for k, v in state["model"].items()
              if v.is_floating_point() and "running" not in k}
    return state["global_step"], params


def test_torchrun_cli_two_processes(tmp_path):
    root = write_fake_fashion(tmp_path / "fashion", **FAKE)
    args = ["-m", "rcl_train", *COMMON, "--data-root", root, "--loss", "rcl", "--tail-margin", "0.2",
            "--max-steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    (port,) = free_ports(1)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("== rcl-train report") == 1, two.stdout  # rank 0 alone reports
    assert json.load(open(tmp_path / "two" / "report.json"))
    step1, params1 = _checkpoint_params(tmp_path / "one")
    step2, params2 = _checkpoint_params(tmp_path / "two")
    assert step1 == step2 == 2
    num = sum(((params1[k] - params2[k]) ** 2).sum() for k in params1)
    den = sum((params1[k] ** 2).sum() for k in params1)
    relative = (num / den).sqrt().item()
    assert relative < 5e-3, f"parameters differ by {relative:.2e} (relative norm)"
