"""The training objective: alpha * LA-CE(logits) + beta * {BCL, RCL, SupCon, nothing}(features).

The contrastive terms come from rcl_kernels; `backend` picks its implementation
(auto, reference, cpu, triton, cuda).
"""

from __future__ import annotations

import torch

LOSSES = ("none", "supcon", "bcl", "rcl")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class Objective:
    def __init__(self, kind: str, class_counts: torch.Tensor, *, alpha: float = 2.0,
                 beta: float = 0.6, temperature: float = 0.1, backend: str = "auto",
                 feature_scale: float | None = None, tail_margin: float = 0.0,
                 la_tau: float = 1.0):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown loss backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        import rcl_kernels as rk  # imported here so that bad flags are reported before the import

        if backend != "auto":
            reason = rk.available_backends().get(backend)
            if reason:
                raise ValueError(f"--loss-backend {backend} is not available here: {reason}")
        self.rk = rk
        self.kind = kind
        self.class_counts = class_counts
        self.alpha, self.beta = alpha, beta
        self.temperature = temperature
        self.backend = backend
        self.feature_scale = feature_scale
        self.tail_margin = tail_margin
        self.la_tau = la_tau
        self.process_group = None  # set by distributed.py under torchrun

    @property
    def needs_contrastive(self) -> bool:
        return self.kind != "none"

    def to(self, device):
        self.class_counts = self.class_counts.to(device)
        return self

    def contrastive(self, features: torch.Tensor, labels: torch.Tensor,
                    centers: torch.Tensor | None) -> torch.Tensor:
        rk, kw = self.rk, {"backend": self.backend}
        if self.process_group is not None:
            kw["process_group"] = self.process_group
        if self.kind == "supcon":
            return rk.supcon_loss(features, labels, temperature=self.temperature,
                                  base_temperature=self.temperature, **kw)
        if self.kind == "bcl":
            return rk.bcl_loss(features, labels, centers, temperature=self.temperature, **kw)
        if self.kind == "rcl":
            if self.feature_scale is not None:
                kw["feature_scale"] = self.feature_scale
            return rk.rcl_loss(features, labels, centers, self.class_counts,
                               temperature=self.temperature, tail_margin=self.tail_margin, **kw)
        raise AssertionError(self.kind)

    def __call__(self, logits, labels, features=None, centers=None):
        """features [B, V, d] (normalized), centers [C, d]; returns (total, {part: float tensor})."""
        ce = self.rk.logit_adjusted_cross_entropy(logits.float(), labels, self.class_counts,
                                                  tau=self.la_tau)
        parts = {"ce": ce.detach()}
        total = self.alpha * ce
        if self.needs_contrastive:
            con = self.contrastive(features, labels, centers)
            parts["con"] = con.detach()
            total = total + self.beta * con
        parts["loss"] = total.detach()
        return total, parts
