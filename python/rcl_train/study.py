"""A recipe study: LA-CE, BCL and BCL+RCL over seeds on one long-tailed dataset, then a results
table (balanced accuracy and many/medium/few, mean ± std over seeds) as markdown and JSON, and
the curves PNG (bench/train_study.sh runs it on Fashion-MNIST-LT, rho = 100).

    python -m rcl_train.study --data-root DIR --out DIR [--epochs N | --epochs auto --budget-s S]
        [--target-epochs 100] [--seeds 0 1 2] [--parallel K] [--work-dir DIR] -- [rcl-train flags]

Runs go in --work-dir (default <out>/runs): K at once as separate processes (K = 1: one after the
other in this process). --epochs auto measures first: every run for two epochs at the planned
concurrency (the second epoch and its evaluation give the time per epoch), then takes the longest
schedule that fits what is left of --budget-s, at most --target-epochs (see plan_epochs).
<out> receives study.json (settings, the plan and its measurements, every run's per-epoch
metrics, the table), study.md and curves.png; with --work-dir outside <out> (bench/train_study.sh),
nothing else, so that a machine handing back few files returns all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .cli import main as train_main
from .config import (LOSS_ONLY_FLAGS, TRAIN_FLAGS_EPILOG, HelpFormatter, float_at_least,
                     positive_int, parse_config, seed_int)
from .data import DataNotFoundError, load_dataset
from .outdir import prepare_out_dir

RECIPES = {"LA-CE": ["--loss", "none"], "BCL": ["--loss", "bcl"], "BCL+RCL": ["--loss", "rcl"]}
INTERRUPTED = 130  # rcl-train's exit status after a Ctrl-C
KEYS = ("balanced_accuracy", "overall_accuracy", "many", "medium", "few")
SUMMARY_RESERVE_S = 20  # kept from the budget for the table and the plot


def slug(recipe: str) -> str:
    return recipe.lower().replace("+", "_").replace("-", "")


def flags_for(recipe: str, flags: list[str]) -> list[str]:
    """`flags` without those that do not apply to `recipe`'s loss (config.LOSS_ONLY_FLAGS: e.g.
    --tail-margin goes to BCL+RCL alone; rcl-train refuses it with another loss)."""
    loss = RECIPES[recipe][1]
    out, i = [], 0
    while i < len(flags):
        flag, inline = flags[i].partition("=")[0], "=" in flags[i]
        losses = LOSS_ONLY_FLAGS.get(flag)
        width = 2 if losses is not None and not inline else 1  # --flag VALUE or --flag=VALUE
        if losses is None or loss in losses:
            out += flags[i:i + width]
        i += width
    return out


def plan_epochs(budget_s: float, per_epoch_s: float, startup_s: float, waves: int,
                target: int) -> int:
    """The most epochs (at most `target`, at least 1) such that `waves` rounds of runs, each
    `startup_s` plus epochs x `per_epoch_s` (an epoch with its evaluation, at the concurrency the
    runs will have), fit in `budget_s`."""
    per_wave = budget_s / max(1, waves) - startup_s
    return max(1, min(int(target), math.floor(per_wave / per_epoch_s) if per_epoch_s > 0 else target))


class Study:
    def __init__(self, args, train_flags: list[str], log=print):
        self.args, self.flags, self.log = args, train_flags, log
        self.work = args.work_dir or os.path.join(args.out, "runs")
        self.t0 = time.perf_counter()
        self.jobs = [(r, s) for s in args.seeds for r in RECIPES]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def argv(self, recipe: str, seed: int, epochs: int, out: str, extra=()) -> list[str]:
        return [*flags_for(recipe, self.flags), *RECIPES[recipe], "--seed", str(seed), "--epochs", str(epochs),
                "--no-progress", "--no-plots", "--out", out, *extra]

    def run_one(self, job) -> dict:
        """One rcl-train run; returns its exit code, wall time and output directory."""
        recipe, seed, epochs, out, extra = job
        argv = self.argv(recipe, seed, epochs, out, extra)
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        if self.args.parallel == 1:
            code = train_main(argv)
        else:
            left = self.args.budget_s - self.elapsed() if self.args.budget_s else None
            with open(os.path.join(out, "log.txt"), "w") as logf:
                try:
                    code = subprocess.run([sys.executable, "-m", "rcl_train", *argv], stdout=logf,
                                          stderr=subprocess.STDOUT, timeout=left).returncode
                except subprocess.TimeoutExpired:
                    code = "timeout"
        wall = time.perf_counter() - t0
        if code == INTERRUPTED:  # Ctrl-C reached the run: stop the study, not only this run
            raise KeyboardInterrupt
        self.log(f"{recipe} seed {seed}: exit {code} after {wall:.0f} s")
        return {"recipe": recipe, "seed": seed, "exit": code, "wall_s": wall, "out": out}

    def run_all(self, jobs) -> list[dict]:
        with ThreadPoolExecutor(max(1, self.args.parallel)) as pool:
            return list(pool.map(self.run_one, jobs))

    def calibrate(self) -> dict:
        """Two epochs of every run at the planned concurrency: the time of an epoch (the second,
        with its evaluation) and of a run's start-up (process, data, model)."""
        cfg = parse_config(self.flags)
        data = load_dataset(cfg.dataset, cfg.data_root, cfg.imbalance, cfg.data_seed,
                            cfg.limit_train, cfg.limit_test)
        steps = 2 * max(1, len(data.train_y) // min(cfg.batch_size, len(data.train_y)))
        target = self.args.target_epochs
        jobs = [(r, s, target, os.path.join(self.work, "calibrate", f"{slug(r)}_s{s}"),
                 ["--max-steps", str(steps)]) for r, s in self.jobs]
        done = self.run_all(jobs)
        per_epoch, startup = [], []
        for d in done:
            rows, rep = _read_run(d["out"])
            if d["exit"] != 0 or len(rows) < 2 or rep is None:
                raise RuntimeError(f"calibration run {d['out']} failed (exit {d['exit']}); see its log")
            evaluation = rows[1].get("eval_time_s", 0.0)
            per_epoch.append(rows[1]["epoch_time_s"] + evaluation)
            # the rest of the run's wall time (process start, data, model, the first epoch's
            # extra cost, the final evaluation of a stopped run) is start-up
            startup.append(max(0.0, d["wall_s"] - 2 * per_epoch[-1] - evaluation))
        parallel = self.args.parallel > 1
        # runs that share the device go at the pace of the slowest; one after another, they add up
        cal = {"steps": steps, "per_epoch_s": per_epoch, "startup_s": startup,
               "epoch_s": max(per_epoch) if parallel else sum(per_epoch),
               "start_s": max(startup) if parallel else sum(startup),
               "waves": math.ceil(len(self.jobs) / self.args.parallel) if parallel else 1,
               "seconds": self.elapsed()}
        left = self.args.budget_s - self.elapsed() - SUMMARY_RESERVE_S
        cal["budget_left_s"] = left
        cal["epochs"] = plan_epochs(left, cal["epoch_s"], cal["start_s"], cal["waves"], target)
        self.log(f"calibration: {cal['epoch_s']:.1f} s per epoch of the {'slowest' if parallel else 'summed'} "
                 f"run(s), {cal['start_s']:.1f} s start-up, {cal['waves']} wave(s), {left:.0f} s left "
                 f"-> {cal['epochs']} epochs (target {target})")
        return cal

    def run(self) -> dict:
        args = self.args
        cal = self.calibrate() if args.epochs == "auto" else None
        epochs = cal["epochs"] if cal else int(args.epochs)
        jobs = [(r, s, epochs, os.path.join(self.work, f"{slug(r)}_s{s}"), []) for r, s in self.jobs]
        done = self.run_all(jobs)
        doc = summarize(done, epochs, self.flags, cal, self.elapsed())
        write_outputs(args.out, doc)
        return doc


def _read_run(out: str):
    rows, rep = [], None
    path = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if os.path.isfile(os.path.join(out, "report.json")):
        with open(os.path.join(out, "report.json")) as f:
            rep = json.load(f)
    return rows, rep


def mean_std(values) -> dict:
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def summarize(done: list[dict], epochs: int, flags: list[str], calibration, seconds: float) -> dict:
    runs, table = [], {}
    for d in done:
        rows, rep = _read_run(d["out"])
        complete = d["exit"] == 0 and rep is not None and rep.get("epochs_done") == epochs
        runs.append({"recipe": d["recipe"], "seed": d["seed"], "exit": d["exit"],
                     "complete": complete, "wall_s": d["wall_s"], "history": rows,
                     **({k: rep[k] for k in KEYS + ("images_per_s", "mean_epoch_time_s", "device",
                                                    "loss_backend", "autocast")}
                        if complete else {})})
    for recipe in RECIPES:
        ok = [r for r in runs if r["recipe"] == recipe and r["complete"]]
        table[recipe] = {"seeds": [r["seed"] for r in ok],
                         **{k: mean_std(r[k] for r in ok) for k in KEYS + ("images_per_s",)}}
    device = next((r["device"] for r in runs if r.get("device")), "n/a")
    return {"epochs": epochs, "train_flags": flags, "device": device, "calibration": calibration,
            "seconds": seconds, "table": table, "runs": runs}


def fmt(cell: dict, scale: float = 100.0, digits: int = 2) -> str:
    if cell["mean"] is None:
        return "n/a"
    s = f"{scale * cell['mean']:.{digits}f}"
    return s + (f" ± {scale * cell['std']:.{digits}f}" if cell["std"] is not None else "")


def markdown(doc: dict) -> str:
    lines = [f"Epochs {doc['epochs']}; rcl-train flags `{' '.join(doc['train_flags'])}`; device "
             f"{doc['device']}; {doc['seconds']:.0f} s in all. Accuracy in % on the balanced test "
             "set, mean ± sample std over the seeds; groups by training images per class: many > "
             "100, medium 20-100, few < 20 (n/a: no such class).", "",
             "| recipe | seeds | balanced | many | medium | few | overall | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, row in doc["table"].items():
        lines.append(f"| {recipe} | {len(row['seeds'])} | {fmt(row['balanced_accuracy'])} | "
                     f"{fmt(row['many'])} | {fmt(row['medium'])} | {fmt(row['few'])} | "
                     f"{fmt(row['overall_accuracy'])} | {fmt(row['images_per_s'], 1, 0)} |")
    bad = [r for r in doc["runs"] if not r["complete"]]
    if bad:
        lines += ["", "Incomplete runs (left out of the table): " + ", ".join(
            f"{r['recipe']} seed {r['seed']} (exit {r['exit']})" for r in bad)]
    cal = doc["calibration"]
    if cal:
        lines += ["", f"Schedule chosen by measurement: two epochs of every run at the study's "
                  f"concurrency took {cal['epoch_s']:.2f} s per epoch (with its evaluation) and "
                  f"{cal['start_s']:.1f} s of start-up; {cal['waves']} wave(s) in the "
                  f"{cal['budget_left_s']:.0f} s left -> {cal['epochs']} epochs."]
    return "\n".join(lines)


def plot_curves(path: str, doc: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for recipe in RECIPES:
        runs = [r for r in doc["runs"] if r["recipe"] == recipe and r["complete"]]
        if not runs:
            continue
        for ax, key in ((axes[0], "test_balanced_accuracy"), (axes[1], "loss")):
            series = [[row.get(key, np.nan) for row in r["history"]] for r in runs]
            y = np.array(series, dtype=float)
            x = np.arange(1, y.shape[1] + 1)
            mean, std = np.nanmean(y, 0), np.nanstd(y, 0)
            ax.plot(x, mean, label=f"{recipe} ({len(runs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    axes[0].set_title("test balanced accuracy (mean ± std over seeds)")
    axes[1].set_title("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:  # no complete run: an empty plot, no legend
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: str, doc: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(markdown(doc) + "\n")
    plot_curves(os.path.join(out, "curves.png"), doc)


def _epochs(text: str):
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rcl_train.study", description=__doc__.split("\n\n")[0],
                                epilog=TRAIN_FLAGS_EPILOG + " Flags of one loss only (--tail-margin, "
                                "--feature-scale) go to the recipes of that loss alone.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="where study.json, study.md and curves.png go")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: <out>/runs)")
    p.add_argument("--epochs", type=_epochs, default="auto",
                   help="epochs of every run, or auto: the most that fit --budget-s")
    p.add_argument("--target-epochs", type=positive_int, default=100,
                   help="the most epochs --epochs auto may choose")
    p.add_argument("--budget-s", type=float_at_least(0.0, strict=True), default=None,
                   help="seconds for the whole study (needed by --epochs auto; default: none)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2],
                   help="training seeds; every recipe runs with each")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="runs at once (separate processes); 1 = one after the other, in-process")
    args, flags = p.parse_known_args(argv)
    if args.epochs == "auto" and not args.budget_s:
        p.error("--epochs auto needs --budget-s")
    flags = [a for a in flags if a != "--"]
    try:
        prepare_out_dir(args.out)
        if args.work_dir:
            prepare_out_dir(args.work_dir, "--work-dir")
        doc = Study(args, flags).run()
    except (ValueError, DataNotFoundError) as e:  # the data, a directory
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # a failed calibration run, writing the results
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{p.prog}: error: interrupted; the finished runs are in {args.work_dir or os.path.join(args.out, 'runs')}",
              file=sys.stderr)
        return INTERRUPTED
    print(markdown(doc))
    return 0 if all(r["complete"] for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
