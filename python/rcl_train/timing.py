"""Per-step time split into data / model / loss / optim, without a host sync of its own.

Marks are taken at the phase boundaries of a training step: `perf_counter` on the CPU (where the
ops are synchronous), CUDA events on a GPU (recorded on the current stream, read once per epoch
after a synchronize). The backward pass is split by gradient hooks on the model's outputs: a
hook on a tensor runs just before the node that made it runs backward, and autograd runs every
node of the loss (created later, so of higher priority) before any node of the model, so the
first of those hooks marks where the model's backward begins.

    data   indexing the device-resident training set + augmentation (+ the rank's share)
    model  the network's forward and backward
    loss   the objective's forward and backward (LA-CE + the contrastive loss)
    optim  the finiteness check (the step's one host sync) + optimizer and scheduler step

Cost: on a GPU, 7 event records per step (a few microseconds of host time each) and one Python
hook call per model output; nothing waits on the GPU until the epoch ends.
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

    def hook_model_outputs(self, *tensors) -> None:
        """Mark "loss_backward" (the end of the loss's backward) when the backward of the first
        of `tensors`, the model's outputs, begins."""
        for t in tensors:
            if t is not None and t.requires_grad:
                t.register_hook(self._model_backward_begins)

    def _model_backward_begins(self, grad):
        if "loss_backward" not in self._marks:
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
