"""Training-step time of rcl-train per loss backend and batch size, split into data / model /
loss / optim, with images/s and peak GPU memory.

    python -m rcl_train.throughput --backends reference,auto --batch-sizes 256,max \\
        [--steps 10] [--warmup 3] [--out DIR] -- [rcl-train flags: --data-root DIR --loss rcl ...]

Each (backend, batch size) builds the real Trainer (the data is loaded once), runs `--warmup`
steps, then times `--steps` steps of `Trainer.train_step` (wall clock over the steps, after a
synchronize; the split comes from the step's own timer). `max` is the largest batch that fits:
the whole training set first, then halved on out-of-memory. Peak memory is CUDA's
max_memory_allocated over the timed steps (not measured on the CPU). Writes throughput.json and
throughput.md into --out and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

from .config import TRAIN_FLAGS_EPILOG, HelpFormatter, int_at_least, parse_config
from .data import DataNotFoundError, load_dataset
from .errors import NonFiniteError
from .losses import BACKENDS
from .outdir import prepare_out_dir
from .train import Trainer, epoch_order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(argv: list[str], data, steps: int, warmup: int) -> dict:
    """Time `steps` training steps of the run configured by rcl-train flags `argv`."""
    cfg = parse_config(argv)
    trainer = Trainer(cfg, log=lambda *a, **k: None, data=data)
    device, n, B = trainer.device, len(trainer.train_y), trainer.batch_size
    order = epoch_order(n, cfg.seed, 0).to(device)
    batches = [order[(i * B) % (n - B + 1):][:B] for i in range(warmup + steps)]
    for idx in batches[:warmup]:
        trainer.train_step(idx)
    _sync(device)
    trainer.timer.collect()  # forget the warm-up steps
    if device.type == "cuda":  # and their peak (Triton's autotuning, cuDNN's algorithm search)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for idx in batches[warmup:]:
        trainer.train_step(idx)
    _sync(device)
    wall = time.perf_counter() - t0
    row = {"backend": cfg.loss_backend, "batch": B, "step_ms": 1000 * wall / steps,
           "split_ms": trainer.timer.collect(), "images_per_s": B * steps / wall,
           "peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                       if device.type == "cuda" else None),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "autocast": str(trainer.amp_dtype or "off"), "loss": cfg.loss}
    del trainer
    return row


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def run(backends, batch_sizes, steps, warmup, train_argv, out_dir, log=print):
    """Measure every (backend, batch size); write throughput.{json,md}; return (rows, n)."""
    cfg = parse_config(train_argv)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.imbalance, cfg.data_seed,
                        cfg.limit_train, cfg.limit_test)
    n = len(data.train_y)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for backend in backends:
            for size in batch_sizes:
                batch = n if size == "max" else min(int(size), n)
                while True:
                    argv = train_argv + ["--loss-backend", backend, "--batch-size", str(batch),
                                         "--out", scratch, "--no-progress", "--no-plots"]
                    try:
                        row = measure(argv, data, steps, warmup)
                        break
                    except ValueError as e:  # e.g. a loss backend not available here
                        row = {"backend": backend, "batch": batch, "error": str(e)}
                        break
                    except NonFiniteError as e:  # timed steps of a diverging run mean nothing
                        row = {"backend": backend, "batch": batch, "error": f"diverged: {e}"}
                        break
                    except Exception as e:
                        if not _is_oom(e):
                            raise
                    # Out of memory. Freed here, after the except clause: until it ends, the
                    # exception's traceback holds the failed run's frames (Trainer, activations).
                    gc.collect()
                    torch.cuda.empty_cache()
                    log(f"{backend} batch {batch}: out of memory")
                    if size != "max" or batch <= 1:
                        row = {"backend": backend, "batch": batch, "error": "out of memory"}
                        break
                    batch //= 2
                row["requested"] = size
                rows.append(row)
                log(_line(row))
                _write(out_dir, rows, n, train_argv, steps, warmup)  # each row as it comes
    return rows, n


def _write(out_dir, rows, n, train_argv, steps, warmup) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "throughput.json"), "w") as f:
        json.dump({"train_flags": train_argv, "training_images": n, "steps": steps,
                   "warmup": warmup, "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, "throughput.md"), "w") as f:
        f.write(table(rows, n) + "\n")


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['backend']} batch {row['batch']}: {row['error']}"
    split = ", ".join(f"{k} {v:.2f}" for k, v in row["split_ms"].items())
    peak = f", peak {row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else ""
    return (f"{row['backend']} batch {row['batch']}: {row['step_ms']:.2f} ms/step ({split}), "
            f"{row['images_per_s']:.0f} images/s{peak}")


def table(rows: list[dict], n: int) -> str:
    lines = [f"Training step of rcl-train per loss backend (the whole training set has {n} images; "
             "`max` = the largest batch that fits, at most all of them).", "",
             "| loss backend | batch | ms / step | data | model | loss | optim | images/s | peak MB | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        batch = f"{r['batch']}" + (" (max)" if r.get("requested") == "max" else "")
        if "error" in r:
            lines.append(f"| {r['backend']} | {batch} | {r['error']} | | | | | | | |")
            continue
        s = r["split_ms"]
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['backend']} | {batch} | {r['step_ms']:.2f} | {s['data']:.2f} | "
                     f"{s['model']:.2f} | {s['loss']:.2f} | {s['optim']:.2f} | "
                     f"{r['images_per_s']:.0f} | {peak} | {r['device']} |")
    return "\n".join(lines)


def _batch_size(text: str):
    if text == "max":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'max', got {text!r}")
    return int(text)


def _list_of(parse):
    """A comma-separated list of at least one item, each read by `parse`."""
    def read(text: str) -> list:
        items = [parse(b) for b in text.split(",") if b.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items
    return read


def _backend(text: str) -> str:
    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; expected some of "
                                         f"{', '.join(BACKENDS)}")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rcl_train.throughput",
                                description=__doc__.split("\n\n")[0], epilog=TRAIN_FLAGS_EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--backends", default=["reference", "auto"], type=_list_of(_backend),
                   help=f"comma-separated loss backends ({', '.join(BACKENDS)})")
    p.add_argument("--batch-sizes", default=[256, "max"], type=_list_of(_batch_size),
                   help="comma-separated batch sizes; max = the largest that fits")
    p.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int_at_least(0), default=3,
                   help="untimed steps before them")
    p.add_argument("--out", default="runs/throughput",
                   help="where throughput.json and throughput.md go")
    args, train_argv = p.parse_known_args(argv)
    train_argv = [a for a in train_argv if a != "--"]
    try:
        prepare_out_dir(args.out)
        rows, n = run(args.backends, args.batch_sizes, args.steps, args.warmup, train_argv,
                      args.out)
    except (ValueError, DataNotFoundError) as e:  # the data, --out, a bad rcl-train flag value
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(table(rows, n))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
