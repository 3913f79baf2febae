"""Checkpoints that resume exactly: model, optimizer, position in the schedule and every RNG state.

The epoch's sample order is a pure function of (seed, epoch), so a run resumed mid-epoch skips the
batches already done; augmentation draws from torch's global generator whose state is restored.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, **payload) -> None:
    """Write atomically (temporary file then rename) so an interrupted save never corrupts the last one."""
    payload["rng"] = rng_state()
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path


def load_checkpoint(path: str) -> dict:
    # Our own files: they hold numpy RNG state and python objects, so no weights_only.
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False)
