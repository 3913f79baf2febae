"""`make demo`: a short BCL+RCL training on Fashion-MNIST-LT (rho = 100) on the CPU, then its report.

    python -m rcl_train.demo [--epochs N] [--out DIR] [extra rcl-train flags...]

Installs nothing. When the Fashion-MNIST files are missing it says how to get them and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .data import DEFAULT_FMNIST_ROOT, FMNIST_FILES, FMNIST_HELP

DEMO_EPOCHS = 3


def fashion_present(root: str) -> bool:
    return all(os.path.isfile(os.path.join(root, stem + ".gz")) or os.path.isfile(os.path.join(root, stem))
               for stem in FMNIST_FILES.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rcl_train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-root", default=DEFAULT_FMNIST_ROOT)
    args, extra = p.parse_known_args(argv)
    if not fashion_present(args.data_root):
        print(f"demo: Fashion-MNIST is not installed in {args.data_root}.\n{FMNIST_HELP}",
              file=sys.stderr)
        return 1
    from .cli import main as train_main

    argv = ["--dataset", "fmnist-lt", "--data-root", args.data_root, "--imbalance", "100",
            "--loss", "rcl", "--loss-backend", "auto", "--device", "cpu", "--epochs", str(args.epochs),
            "--warmup-epochs", "0.5", "--seed", "0", "--out", args.out, *extra]
    print("demo: rcl-train " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    code = train_main(argv)
    print(f"demo: finished in {time.perf_counter() - t0:.0f} s (exit status {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
