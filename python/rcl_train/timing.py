"""Per-step time split into data / model / loss / optim, without a host sync of its own.

Marks are taken at the phase boundaries of a training step: `perf_counter` on the CPU (where the
ops are synchronous), CUDA events on a GPU (recorded on the current stream, read once per epoch
after a synchronize). The backward pass is split by a gradient hook on the tensors handed to the
loss: autograd runs the loss's backward nodes (created later, so higher priority) before the
model's, and the hook of the last of those tensors marks the boundary.

    data   indexing the device-resident training set + augmentation (+ the rank's share)
    model  the network's forward and backward
    loss   the objective's forward and backward (LA-CE + the contrastive loss)
    optim  the finiteness check (the step's one host sync) + optimizer and scheduler step

Cost: on a GPU, 6-8 event records per step (a few microseconds of host time each) and one
Python hook call per tensor handed to the loss; nothing waits on the GPU until the epoch ends.
"""

from __future__ import annotations

import time

import torch

PHASES = ("data", "model", "loss", "optim")


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._steps: list[dict] = []
        self._marks: dict = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[name] = event
        else:
            self._marks[name] = time.perf_counter()

    def start(self) -> None:
        self._marks = {}
        self.mark("start")

    def end(self) -> None:
        self.mark("end")
        self._steps.append(self._marks)

    def hook_loss_inputs(self, *tensors) -> None:
        """Mark "loss_backward" when the gradient of each of `tensors` is ready (the last wins)."""
        for t in tensors:
            if t is not None and t.requires_grad:
                t.register_hook(self._loss_backward_hook)

    def _loss_backward_hook(self, grad):
        self.mark("loss_backward")

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000.0 * (b - a)

    def collect(self) -> dict:
        """Mean milliseconds per phase over the steps since the last call (then forgets them)."""
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        if self.cuda:
            steps[-1]["end"].synchronize()
        sums = dict.fromkeys(PHASES, 0.0)
        for m in steps:
            split = m.get("loss_backward", m["backward"])
            sums["data"] += self._ms(m["start"], m["data"])
            sums["model"] += self._ms(m["data"], m["forward"]) + self._ms(split, m["backward"])
            sums["loss"] += self._ms(m["forward"], m["loss"]) + self._ms(m["loss"], split)
            sums["optim"] += self._ms(m["backward"], m["end"])
        return {k: v / len(steps) for k, v in sums.items()}
