"""The training loop: data on the device, three augmented views per image, the objective, SGD,
per-epoch evaluation and metrics (JSON lines), checkpoints that resume exactly, and the final report.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import report as report_mod
from .augment import build_augment
from .checkpoint import (CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint, save_checkpoint,
                         set_rng_state)
from .config import TrainConfig, check_resume_compatible
from .data import load_dataset
from .errors import Interrupted, NonFiniteError, OutputError, error_reason
from . import distributed as dist_run
from .losses import Objective
from .metrics import compute_metrics, predict
from .models import build_model, default_arch
from .optim import build_optimizer, build_scheduler
from .outdir import prepare_out_dir
from .tensorboard_log import TensorBoardLog
from .timing import StepTimer

METRICS_NAME = "metrics.jsonl"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a pure function of (seed, epoch), so resuming needs no state.
    (seed < 2**32, so the generator's seed stays within int64.)"""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or None,
                dynamic_ncols=True, leave=True)


def max_abs(tensors) -> torch.Tensor:
    """max |x| over all of `tensors` as a 0-d tensor, non-finite iff some element is (NaN and inf
    propagate): one concatenation and one min/max reduction, cheaper on the CPU than
    torch.nn.utils.get_total_norm's reduction per tensor (about 0.4 against 1.2 ms a step)."""
    lo, hi = torch.cat([t.reshape(-1) for t in tensors]).aminmax()
    return torch.maximum(hi, -lo)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 by default on CUDA, none on the CPU (slower there in bf16)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else None


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print, data=None):
        """`data`: an already loaded LTDataset of `cfg` (the throughput tool reuses one)."""
        self.dist = None
        if dist_run.world_size() > 1:  # torchrun: data-parallel (python/rcl_train/distributed.py)
            self.dist = dist_run.DistributedRun(cfg.device)
            cfg, log = self.dist.rank_config(cfg, log)
        self.cfg = cfg
        self.log = log
        prepare_out_dir(cfg.out)
        # before the data loads: a missing tensorboard package is reported at once
        self.tb = TensorBoardLog.check(cfg.tensorboard)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":  # fixed batch shapes: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        # channels_last by default: cuDNN's and oneDNN's convolutions are faster in it, on CUDA
        # and on the CPU alike
        self.memory_format = (torch.contiguous_format if cfg.channels_last == "off"
                              else torch.channels_last)
        self.data = data if data is not None else load_dataset(
            cfg.dataset, cfg.data_root, cfg.imbalance, cfg.data_seed, cfg.limit_train, cfg.limit_test)
        seed_everything(cfg.seed)
        self.arch = default_arch(cfg.dataset) if cfg.arch == "auto" else cfg.arch
        self.class_counts = self.data.class_counts
        self.model = build_model(self.arch, self.data.image_shape[0], self.data.num_classes,
                                 feat_dim=cfg.feat_dim).to(self.device, memory_format=self.memory_format)
        self.augment = build_augment(cfg.dataset, self.data.image_shape).to(self.device)
        self.objective = Objective(
            cfg.loss, self.class_counts, alpha=cfg.alpha, beta=cfg.beta,
            temperature=cfg.temperature, backend=cfg.loss_backend,
            feature_scale=cfg.feature_scale, tail_margin=cfg.tail_margin, la_tau=cfg.la_tau,
        ).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.momentum, cfg.weight_decay)
        n = len(self.data.train_y)
        self.batch_size = min(cfg.batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch_size)  # drop the last partial batch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.train_model = self.model  # the DDP wrapper when distributed, compiled on request
        if self.dist is not None:
            self.train_model = self.dist.wrap(self.model, self.objective, self.device,
                                              self.batch_size)
        if cfg.compile:
            try:
                self.train_model = torch.compile(self.train_model, backend=cfg.compile)
            except RuntimeError as e:  # torch._dynamo's InvalidBackend
                raise ValueError(f"--compile {cfg.compile}: not a torch.compile backend here "
                                 f"(available: {', '.join(torch._dynamo.list_backends())})") from e
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         round(cfg.warmup_epochs * self.steps_per_epoch))
        # The whole (long-tailed) training set lives on the device as one uint8 tensor; batches
        # are drawn by index there and augmented there: no DataLoader, no host round trips.
        self.train_x = self.data.train_x.to(self.device)
        self.train_y = self.data.train_y.to(self.device)
        self.test_x = self.data.test_x.to(self.device)
        self.timer = StepTimer(self.device)
        # position: next (epoch, batch) to run
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self.previous_wall = 0.0
        self.saved_step = None  # global step of the checkpoint on disk written or resumed by this run
        # running sums of an epoch stopped mid-way, kept in the checkpoint so that the resumed
        # epoch's metrics row covers all its steps
        self._partial = None
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(cfg.out, METRICS_NAME)
        self._rng_to_restore = None
        if cfg.resume:
            self._load(cfg.resume)
        else:
            open(self.metrics_path, "w").close()
        if cfg.tensorboard:
            self.tb = TensorBoardLog(cfg.tensorboard, purge_step=self.global_step if cfg.resume else None)

    # ------------------------------------------------------------------ checkpoints
    def _kept_checkpoint(self) -> str:
        if os.path.isfile(self.ckpt_path):
            return f"The last good checkpoint, {self.ckpt_path}, is kept."
        return "No checkpoint was written."

    def _save(self) -> None:
        # A finite step can still overflow the parameters (a huge --lr): never save such a model.
        state = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        if not math.isfinite(max_abs(state).item()):
            raise NonFiniteError(
                f"the model has non-finite parameters after step {self.global_step}: not saved. "
                f"{self._kept_checkpoint()} Try a lower --lr.")
        try:
            save_checkpoint(
                self.ckpt_path,
                config=self.cfg.to_dict(), model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                epoch=self.epoch, batch=self.batch,
                global_step=self.global_step, history=self.history,
                wall_time=self.previous_wall + (time.perf_counter() - self.t0),
                epoch_partial=self._partial,
            )
        except OutputError as e:
            raise OutputError(f"{e}. {self.resume_hint()}") from e
        self.saved_step = self.global_step

    def resume_hint(self) -> str:
        """Where this run's last checkpoint is and how to resume from it."""
        if self.saved_step is None:
            return "No checkpoint of this run was written."
        return (f"The last checkpoint, {self.ckpt_path} (step {self.saved_step}), is kept: resume "
                f"with the same flags and --resume {self.cfg.out}.")

    def _load(self, path: str) -> None:
        path = resolve_checkpoint(path)
        ck = load_checkpoint(path)
        check_resume_compatible(ck["config"], self.cfg)
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"--resume: {path}: the saved model or optimizer does not fit this "
                             f"run ({error_reason(e)})") from e
        epoch, batch, step = ck["epoch"], ck["batch"], ck["global_step"]
        if (epoch > self.cfg.epochs or batch >= self.steps_per_epoch
                or step != epoch * self.steps_per_epoch + batch):
            raise ValueError(f"--resume: {path}: field 'epoch', 'batch' or 'global_step': epoch "
                             f"{epoch}, batch {batch}, step {step} is no position of this run "
                             f"({self.cfg.epochs} epochs of {self.steps_per_epoch} steps)")
        self.epoch, self.batch, self.global_step = epoch, batch, step
        self._partial = ck.get("epoch_partial")
        if os.path.abspath(path) == os.path.abspath(self.ckpt_path):
            self.saved_step = step
        self.history = list(ck["history"])
        self.previous_wall = float(ck.get("wall_time", 0.0))
        self._rng_to_restore = ck["rng"]
        with open(self.metrics_path, "w") as f:  # keep the lines of the epochs already done
            for row in self.history:
                f.write(json.dumps(row) + "\n")
        self.log(f"resumed from {path} at epoch {self.epoch}, batch {self.batch} "
                 f"(step {self.global_step}/{self.total_steps})")

    # ------------------------------------------------------------------ one step
    def train_step(self, idx: torch.Tensor) -> dict:
        """One optimizer step on the images `idx` of the training set; returns the logged values
        (floats) and records the step's time split in self.timer."""
        timer = self.timer
        timer.start()
        contrastive = self.objective.needs_contrastive
        y = self.train_y[idx]
        views = self.augment(self.train_x[idx], contrastive=contrastive)
        if self.dist is not None:  # this rank's share of the augmented global batch
            y, *views = self.dist.local_share(y, *views)
        lr = self.optimizer.param_groups[0]["lr"]
        B = len(y)
        x = (torch.cat(views) if len(views) > 1 else views[0]).contiguous(
            memory_format=self.memory_format)
        timer.mark("data")
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            if contrastive:
                z, logits, centers = self.train_model(x)
                timer.hook_model_outputs(z, logits, centers)
                logits = logits[:B]
                feats = torch.stack([z[B:2 * B], z[2 * B:]], dim=1)  # [B, 2, d]
            else:
                logits = self.train_model(x, with_contrastive=False)
                timer.hook_model_outputs(logits)
                feats = centers = None
        timer.mark("forward")
        # Outside autocast: the loss runs in the dtype the features come in.
        loss, parts = self.objective(logits, y, feats, centers)
        if self.dist is not None:  # log the global-batch values
            parts = self.dist.mean_over_ranks(parts)
        timer.mark("loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        timer.mark("backward")
        # max|g| over every gradient (NaN and inf propagate) read back with the logged values in
        # a single transfer: the step's only host sync of its own. Under DDP the gradients and
        # logged values are the same on every rank, so every rank stops alike.
        grad_max = max_abs([p.grad for p in self.model.parameters() if p.grad is not None])
        names = list(parts)
        values = torch.stack([parts[k].double() for k in names] + [grad_max.double()]).tolist()
        out = dict(zip(names, values[:-1]))
        if not (math.isfinite(out["loss"]) and math.isfinite(values[-1])):
            what = "loss" if not math.isfinite(out["loss"]) else "gradient"
            raise NonFiniteError(
                f"non-finite {what} at step {self.global_step + 1} (epoch {self.epoch + 1}, "
                f"lr {lr:.4g}; loss {out['loss']}, max |gradient| {values[-1]}): stopped before "
                f"the optimizer step. {self._kept_checkpoint()} Try a lower --lr.")
        self.optimizer.step()
        self.scheduler.step()
        timer.end()
        out["lr"] = lr
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        preds = predict(self.model, self.augment, self.test_x, amp_dtype=self.amp_dtype,
                        memory_format=self.memory_format)
        return compute_metrics(preds, self.data.test_y, self.class_counts.tolist(),
                               self.data.class_names)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
        n = len(self.train_y)
        self.log(f"{cfg.dataset} rho={cfg.imbalance:g}: {n} training images, "
                 f"class counts {self.class_counts.tolist()}, {len(self.data.test_y)} test images; "
                 f"{self.arch}, loss alpha*LA-CE + beta*{cfg.loss} (backend {cfg.loss_backend}), "
                 f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {self.device} "
                 f"(autocast {self.amp_dtype or 'off'}, "
                 f"{'channels_last' if self.memory_format == torch.channels_last else 'contiguous'}"
                 f"{', compiled with ' + cfg.compile if cfg.compile else ''})")
        bar = _progress_bar(self.total_steps, self.global_step, cfg.progress, "train")
        stopped = False
        last_eval = None
        try:
            while self.epoch < cfg.epochs and not stopped:
                order = epoch_order(n, cfg.seed, self.epoch).to(self.device)
                # an epoch resumed mid-way continues the sums of its first part
                part = self._partial or {"sums": {}, "steps": 0, "images": 0, "seconds": 0.0,
                                         "step_ms": {}}
                self._partial = None
                sums, count, ep_images = dict(part["sums"]), part["steps"], part["images"]
                ep_t0 = time.perf_counter() - part["seconds"]
                while self.batch < self.steps_per_epoch:
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                        stopped = True
                        break
                    idx = order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
                    parts = self.train_step(idx)
                    self.global_step += 1
                    self.batch += 1
                    count += 1
                    ep_images += len(idx)
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if self.tb:
                        self.tb.step(self.global_step, parts)
                    rate = ep_images / max(time.perf_counter() - ep_t0, 1e-9)
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{parts['loss']:.3f}",
                                    lr=f"{parts['lr']:.4f}", img_s=f"{rate:.0f}", refresh=False)
                    bar.update(1)
                step_ms = _merge_step_ms(part["step_ms"], part["steps"], self.timer.collect(),
                                         count - part["steps"])
                if stopped and self.batch < self.steps_per_epoch:
                    # mid-epoch stop: the checkpoint below records the position and the sums
                    self._partial = {"sums": sums, "steps": count, "images": ep_images,
                                     "seconds": time.perf_counter() - ep_t0, "step_ms": step_ms}
                    break
                ep_time = time.perf_counter() - ep_t0
                row = {"epoch": self.epoch + 1, "step": self.global_step}
                row.update({k: v / max(1, count) for k, v in sums.items() if k != "lr"})
                row["lr"] = sums.get("lr", 0.0) / max(1, count)
                row["epoch_time_s"] = ep_time
                row["images_per_s"] = ep_images / ep_time if ep_time > 0 else None
                row["step_ms"] = step_ms  # mean per step: data, model, loss, optim
                row["resumed_mid_epoch"] = count < self.steps_per_epoch
                last_epoch = self.epoch + 1 == cfg.epochs
                if (cfg.eval_every and (self.epoch + 1) % cfg.eval_every == 0) or last_epoch:
                    t_eval = time.perf_counter()
                    last_eval = self.evaluate()
                    row["eval_time_s"] = time.perf_counter() - t_eval
                    row.update({f"test_{k}": last_eval[k] for k in
                                ("overall_accuracy", "balanced_accuracy", "many", "medium", "few")})
                self.history.append(row)
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if self.tb:
                    self.tb.epoch(row)
                self.epoch += 1
                self.batch = 0
                (bar.write if cfg.progress else self.log)(self._epoch_line(row))
                self._save()
        finally:
            bar.close()
            if self.tb:
                self.tb.close()
        if stopped:
            self._save()
        final = last_eval if (last_eval is not None and not stopped) else self.evaluate()
        wall = self.previous_wall + (time.perf_counter() - self.t0)
        rep = report_mod.build_report(final, self.cfg, self.history, wall, extra={
            "arch": self.arch, "device": str(self.device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps_done": self.global_step,
            "total_steps": self.total_steps, "stopped_early": stopped,
            "train_images": n, "class_counts": self.class_counts.tolist(),
            "test_images": len(self.data.test_y), "loss_backend": cfg.loss_backend,
            "autocast": str(self.amp_dtype or "off"),
            "channels_last": self.memory_format == torch.channels_last,
        })
        written = report_mod.write_report(cfg.out, rep, self.history, self.data.class_names,
                                          plots=cfg.plots)
        rep["files"] = written + [METRICS_NAME, CHECKPOINT_NAME]  # for the CLI's last line
        return rep

    @staticmethod
    def _epoch_line(row: dict) -> str:
        s = f"epoch {row['epoch']}: loss {row.get('loss', float('nan')):.4f} lr {row['lr']:.4f}"
        if row.get("images_per_s"):
            s += f" {row['images_per_s']:.0f} img/s ({row['epoch_time_s']:.1f} s)"
        if "test_balanced_accuracy" in row:
            s += (f" | test acc {row['test_overall_accuracy']:.4f}"
                  f" balanced {row['test_balanced_accuracy']:.4f}")
        return s


def _merge_step_ms(first: dict, first_steps: int, second: dict, second_steps: int) -> dict:
    """The mean step split over both parts of an epoch resumed mid-way."""
    if not first or not second:
        return second or first
    total = first_steps + second_steps
    return {k: (first.get(k, 0.0) * first_steps + v * second_steps) / total
            for k, v in second.items()}


def train(cfg: TrainConfig, log=print) -> dict:
    trainer = Trainer(cfg, log=log)
    try:
        return trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {trainer.global_step}. "
                          f"{trainer.resume_hint()}") from None
    finally:
        if trainer.dist is not None:
            trainer.dist.close()

