"""Optional TensorBoard logging (--tensorboard DIR) through torch.utils.tensorboard.SummaryWriter:
every step's loss terms and learning rate under train/, every epoch's metrics row under epoch/,
both against the global step."""

from __future__ import annotations

import math

from .errors import error_reason
from .outdir import prepare_out_dir

# keys of a metrics row that are not curves
_NOT_SCALARS = ("epoch", "step", "resumed_mid_epoch")


class TensorBoardLog:
    def __init__(self, logdir: str, purge_step: int | None = None):
        """`purge_step`: a resumed run's step; events a previous run wrote from there on are
        dropped, so the curves do not double back."""
        writer_class = self._writer_class()
        prepare_out_dir(logdir, "--tensorboard")
        self.writer = writer_class(log_dir=logdir, purge_step=purge_step)

    @staticmethod
    def _writer_class():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                             f"(or the rcl_kernels[train] extra) ({error_reason(e)})") from e
        return SummaryWriter

    @classmethod
    def check(cls, logdir: str | None) -> None:
        """Raise the missing-package error now when `logdir` is set; returns no writer."""
        if logdir:
            cls._writer_class()

    def step(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def epoch(self, row: dict) -> None:
        for k, v in row.items():
            if k in _NOT_SCALARS or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"epoch/{k}", v, row["step"])
            elif isinstance(v, dict):  # the step split
                for part, ms in v.items():
                    self.writer.add_scalar(f"epoch/{k}/{part}", ms, row["step"])

    def close(self) -> None:
        self.writer.close()
