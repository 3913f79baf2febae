"""rcl_train: a thin training harness for long-tailed recognition with LA-CE + BCL/RCL/SupCon.

Modules: data (datasets and long-tailed sampling), augment (kornia three-view augmentation),
models (ResNets, cosine classifier, BCL heads), losses (the objective over rcl_kernels),
optim (SGD, warm-up + cosine), checkpoint (exact resume), errors (what the CLI reports),
metrics (evaluation), report (report.json, plots, summary), timing (the per-step split),
train (the loop), config/cli (flags and recipes), demo (make demo), study (recipes x seeds, the
results table; bench/train_study.sh), throughput (step time per loss backend and batch size).
"""

__all__ = ["main"]


def main(argv=None):
    from .cli import main as _main

    return _main(argv)
