"""Command-line flags -> a validated TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass

from .data import DATASETS, DEFAULT_FMNIST_ROOT
from .losses import BACKENDS, LOSSES
from .models import ARCH_DEPTHS

# Fields that must agree between a checkpoint and the run resuming it.
RESUME_IDENTITY = (
    "dataset", "imbalance", "data_seed", "limit_train", "arch", "feat_dim", "loss", "alpha", "beta",
    "temperature", "feature_scale", "tail_margin", "la_tau", "epochs", "batch_size", "lr",
    "momentum", "weight_decay", "warmup_epochs", "seed",
)


# Flags that apply to some contrastive losses only: rcl-train refuses them with another --loss,
# and the study passes them to those recipes alone.
LOSS_ONLY_FLAGS = {"--feature-scale": ("rcl",), "--tail-margin": ("rcl",)}

SEED_MAX = 2**32 - 1  # NumPy's seed range; the harness derives its generators' seeds from it

# Presets: the defaults of a published recipe; flags given on the command line override them.
RECIPES = {
    # BCL on CIFAR-100-LT (Zhu et al., CVPR 2022; github.com/FlamieZhu/Balanced-Contrastive-Learning).
    # From BCL's main.py: SGD lr 0.1 (--lr), momentum 0.9 (--momentum), weight decay 5e-4 (--wd),
    # cosine decay after a linear warm-up (--cos True, adjust_lr), the three views (one for the
    # classifier, two SimAugment views for the contrastive loss), the cosine classifier
    # (--use_norm True) and temperature 0.1 (--temp at commit a56b509; 0.07 later, its ImageNet
    # value). From the paper's CIFAR set-up: ResNet-32, 200 epochs, batch 256, 5 warm-up epochs,
    # loss weights alpha 2.0 / beta 0.6 (main.py's defaults 1.0 / 0.35 are its ImageNet-LT
    # ones). rho = 100 is the CIFAR-100-LT benchmark's imbalance (LDAM's profile, dataset/cifar.py).
    "bcl-cifar100": dict(dataset="cifar100-lt", imbalance=100.0, arch="resnet32", loss="bcl",
                         epochs=200, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4,
                         warmup_epochs=5.0, alpha=2.0, beta=0.6, temperature=0.1, feat_dim=128),
}


@dataclass
class TrainConfig:
    recipe: str | None = None
    dataset: str = "fmnist-lt"
    data_root: str | None = None
    imbalance: float = 100.0
    data_seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    arch: str = "auto"
    feat_dim: int = 128
    loss: str = "rcl"
    loss_backend: str = "auto"
    alpha: float = 2.0
    beta: float = 0.6
    temperature: float = 0.1
    feature_scale: float | None = None
    tail_margin: float = 0.0
    la_tau: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    compile: str | None = None
    threads: int | None = None
    eval_every: int = 1
    out: str = "runs/rcl-train"
    resume: str | None = None
    progress: bool = True
    plots: bool = True
    tensorboard: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def seed_int(text: str) -> int:
    """A seed: an integer in 0..SEED_MAX (larger ones overflow torch's and NumPy's generators)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0..{SEED_MAX}, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer 0..{SEED_MAX}, got {v}")
    return v


def float_at_least(lo: float, strict: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} {lo}, got {text}")
        return v
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to a flag's help, except where the help gives the default in words:
    switches (a bool default reads wrongly: --no-progress (default: True)) and flags whose
    default is None."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


TRAIN_FLAGS_EPILOG = ("Any other flag (after an optional --) goes to every rcl-train run, e.g. "
                      "--data-root DIR --loss-backend cpu --batch-size 64; see rcl-train --help.")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="rcl-train",
        description="Train a long-tailed classifier with LA-CE + BCL/RCL/SupCon (rcl_kernels losses).",
        epilog="Exit status: 0 done; 1 the output could not be written (a full disk); 2 bad flags "
               "or unusable input (data files, --resume, --out); "
               "3 training diverged (non-finite loss, gradient or parameter: stopped before the "
               "optimizer step, the last good checkpoint kept); 130 interrupted (Ctrl-C: the "
               "last checkpoint kept, the message says how to resume).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="start from a published recipe's settings (other flags override them; "
                        "default: none): "
                        + "; ".join(f"{k}: " + " ".join(f"{f}={v}" for f, v in r.items())
                                    for k, r in RECIPES.items()))
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="long-tailed training set (the test set stays balanced)")
    g.add_argument("--data-root", default=None,
                   help=f"data directory (fmnist-lt default: {DEFAULT_FMNIST_ROOT}; CIFAR: required)")
    g.add_argument("--imbalance", type=float_at_least(1.0), default=d.imbalance,
                   help="imbalance ratio rho = n_max / n_min of the long-tailed training set")
    g.add_argument("--data-seed", type=seed_int, default=d.data_seed,
                   help="seed of the long-tailed subset draw (fixed across training seeds)")
    g.add_argument("--limit-train", type=positive_int, default=None,
                   help="keep about this many training images (stratified, for quick "
                        "demos/tests; default: all)")
    g.add_argument("--limit-test", type=positive_int, default=None,
                   help="evaluate on about this many test images (stratified; default: all)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=("auto",) + tuple(ARCH_DEPTHS), default=d.arch,
                   help="backbone; auto = resnet8 for fmnist-lt (28x28), resnet32 for CIFAR")
    g.add_argument("--feat-dim", type=positive_int, default=d.feat_dim,
                   help="contrastive feature dimension")
    g = p.add_argument_group("loss: alpha * LA-CE + beta * contrastive")
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="contrastive term (rcl = BCL + RCL's rebalancing)")
    g.add_argument("--loss-backend", choices=BACKENDS, default=d.loss_backend,
                   help="implementation of the contrastive loss (rcl_kernels backend=); auto: the "
                        "fastest available on the device")
    g.add_argument("--alpha", type=float_at_least(0.0), default=d.alpha, help="LA-CE weight")
    g.add_argument("--beta", type=float_at_least(0.0), default=d.beta, help="contrastive weight")
    g.add_argument("--temperature", type=float_at_least(0.0, strict=True), default=d.temperature,
                   help="temperature of the contrastive loss")
    g.add_argument("--feature-scale", type=float_at_least(0.0, strict=True), default=None,
                   help="RCL feature scale, --loss rcl only (default: rcl_kernels.rcl_loss's "
                        "own, 1.0)")
    g.add_argument("--tail-margin", type=float_at_least(0.0), default=d.tail_margin,
                   help="RCL tail-class margin m_max, --loss rcl only")
    g.add_argument("--la-tau", type=float_at_least(0.0), default=d.la_tau,
                   help="logit-adjustment strength of LA-CE")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help="length of the schedule in epochs")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per step (the global batch under torchrun)")
    g.add_argument("--lr", type=float_at_least(0.0, strict=True), default=d.lr,
                   help="peak learning rate of SGD")
    g.add_argument("--momentum", type=float_at_least(0.0), default=d.momentum,
                   help="SGD momentum")
    g.add_argument("--weight-decay", type=float_at_least(0.0), default=d.weight_decay,
                   help="SGD weight decay")
    g.add_argument("--warmup-epochs", type=float_at_least(0.0), default=d.warmup_epochs,
                   help="linear warm-up length (at most a fifth of the run), then cosine decay")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total (schedule still spans "
                        "--epochs; default: no limit)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=d.seed,
                   help="seed of the model's initialization, the sample order and augmentation")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "bf16", "off"), default=d.amp,
                   help="autocast of the model's forward; auto = bf16 on CUDA, off on the CPU "
                        "(the loss runs outside it, in the dtype the features come in)")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default=d.channels_last,
                   help="channels_last memory format for the model and its inputs; auto = on "
                        "(faster convolutions on CUDA and on the CPU)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model with BACKEND (inductor when none is given; "
                        "default: not compiled)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--eval-every", type=nonneg_int, default=d.eval_every,
                   help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--out", default=d.out, help="output directory")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="checkpoint file or output directory to resume from (default: start afresh)")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log the training curves to TensorBoard event files in DIR (needs "
                        "the tensorboard package; default: off)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a progress bar)")
    g.add_argument("--no-plots", dest="plots", action="store_false",
                   help="skip the PNG plots (default: curves.png and confusion.png)")
    return p


def parse_config(argv=None) -> TrainConfig:
    parser = build_parser()
    recipe = parser.parse_known_args(argv)[0].recipe
    if recipe:
        parser.set_defaults(**RECIPES[recipe])
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        parser.error(f"argument --device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.dataset != "fmnist-lt" and cfg.data_root is None:
        parser.error(f"--dataset {cfg.dataset} needs --data-root (a local copy of the CIFAR python files)")
    for flag, losses in LOSS_ONLY_FLAGS.items():
        field = flag[2:].replace("-", "_")
        if getattr(cfg, field) != getattr(TrainConfig, field) and cfg.loss not in losses:
            parser.error(f"{flag} applies to --loss {' or '.join(losses)} only")
    return cfg


def check_resume_compatible(saved: dict, cfg: TrainConfig) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}"
             for k in RESUME_IDENTITY if saved.get(k) != getattr(cfg, k)]
    if diffs:
        raise ValueError("--resume: the checkpoint was made with different settings ("
                         + "; ".join(diffs) + ")")
