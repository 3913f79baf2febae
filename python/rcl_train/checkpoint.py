"""Checkpoints that resume exactly: model, optimizer, position in the schedule and every RNG state.

The epoch's sample order is a pure function of (seed, epoch), so a run resumed mid-epoch skips the
batches already done; augmentation draws from torch's global generator whose state is restored.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import error_reason

CHECKPOINT_NAME = "checkpoint.pt"


# What every checkpoint of ours holds (a "foreign" file lacks some).
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "epoch", "batch", "global_step",
                   "history", "rng")


def rng_state() -> dict:
    # numpy's state as plain numbers (key array as a list) so that the checkpoint loads with
    # weights_only=True: a foreign file given to --resume cannot run code.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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
    path = resolve_checkpoint(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails in many ways on an empty, truncated or foreign file
        raise ValueError(f"--resume: {path} is not a readable rcl-train checkpoint "
                         f"({error_reason(e)})") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"--resume: {path} is not an rcl-train checkpoint (no {', '.join(missing)})")
    return ck
