"""Deliberately broken candidates for the self-test's own tests, registered when this file runs
(python -m rcl_kernels.selftest --plugin tests/mutant_candidates.py): cpu:perturbed computes a
log-sum-exp 0.1% too large, cpu:crashing kills its process, cpu:hanging never returns."""

import os
import time

from rcl_kernels.dispatch import Candidate, register_candidate
from rcl_kernels.kernels.contract import Kernels
from rcl_kernels.kernels.tiled import TILED


def _perturbed_forward(*args):
    return TILED.forward(*args) * 1.001


def _perturbed_loss_forward_backward(*args):
    lse, positive_dots, dz, dk = TILED.loss_forward_backward(*args)
    return lse * 1.001, positive_dots, dz, dk


def _crash(*args):
    os._exit(3)


def _hang(*args):
    while True:
        time.sleep(1)


for variant, kernels in {
    "perturbed": Kernels(_perturbed_forward, TILED.backward, _perturbed_loss_forward_backward),
    "crashing": Kernels(_crash, _crash, _crash),
    "hanging": Kernels(_hang, _hang, _hang),
}.items():
    register_candidate(Candidate("cpu", "tiled", variant, kernels, description=f"test mutant: {variant}"))
