"""Checkpoints that resume exactly: model, optimizer, position in the schedule and every RNG state.

The epoch's sample order is a pure function of (seed, epoch), so a run resumed mid-epoch skips the
batches already done; augmentation draws from torch's global generator whose state is restored.
A checkpoint is torch.save's zip archive, written atomically; on load the archive's CRC-32s are
checked (torch.load does not check them, so a flipped byte would load as a changed weight) and
its fields are validated once, each error naming the file and the field.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import shutil
import zipfile

import numpy as np
import torch

from .errors import OutputError, error_reason

CHECKPOINT_NAME = "checkpoint.pt"


# What every checkpoint of ours holds (a "foreign" file lacks some).
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "epoch", "batch", "global_step",
                   "history", "rng")
RNG_KEYS = ("python", "numpy", "torch")


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


def _disk_full(e: BaseException, directory: str) -> bool:
    """ENOSPC or a quota, or torch's writer failing (its message carries no errno) on a device
    with less than 1 MiB left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def save_checkpoint(path: str, **payload) -> None:
    """Write atomically (temporary file then rename) so an interrupted or failed save never
    corrupts the last one; the temporary file is removed on any failure, so that it does not hold
    the space a resumed run needs."""
    payload["rng"] = rng_state()
    tmp = path + ".tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, (OSError, RuntimeError)) and _disk_full(e, os.path.dirname(path) or ".")
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        why = "the disk is full" if full else "the write failed"
        raise OutputError(f"cannot write the checkpoint {path}: {why} ({error_reason(e)}); "
                          f"{tmp} was removed") from e


def resolve_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return path


def _verify_archive(path: str) -> None:
    """Every member's CRC-32 against its bytes: a damaged file is refused, not resumed."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a readable rcl-train checkpoint "
                         f"({error_reason(e)})") from e
    if bad is not None:
        raise ValueError(f"--resume: {path} is damaged: the CRC-32 of {bad} does not match its "
                         "bytes (the file changed after it was written); resume from another "
                         "checkpoint or start afresh")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rng(rng) -> str | None:
    """None if `rng` is a state set_rng_state accepts (tried, then the current state put back),
    else what is wrong with it."""
    if not isinstance(rng, dict):
        return f"expected a dict with {', '.join(RNG_KEYS)}, got {_describe(rng)}"
    missing = [k for k in RNG_KEYS if k not in rng]
    if missing:
        return f"no {', '.join(missing)} state"
    current = rng_state()
    try:
        set_rng_state(rng)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, OverflowError) as e:
        return f"not a random-generator state ({error_reason(e)})"
    finally:
        set_rng_state(current)
    return None


def _check_partial(part, batch: int) -> str | None:
    """The running sums of an epoch stopped mid-way (None at an epoch boundary)."""
    if part is None:
        return None
    if not isinstance(part, dict) or not {"sums", "steps", "images", "seconds", "step_ms"} <= set(part):
        return f"expected a dict of sums, steps, images, seconds and step_ms, got {_describe(part)}"
    if part["steps"] != batch or not _is_int(part["images"]) or not _is_number(part["seconds"]):
        return f"inconsistent with batch {batch}: {_describe(part)}"
    for key in ("sums", "step_ms"):
        if not isinstance(part[key], dict) or not all(_is_number(v) for v in part[key].values()):
            return f"{key}: expected a dict of finite numbers, got {_describe(part[key])}"
    return None


def check_fields(ck: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field of a loaded checkpoint that is not what
    rcl-train writes, or None."""
    for key in ("config", "model", "optimizer", "scheduler"):
        if not isinstance(ck[key], dict):
            return key, f"expected a dict, got {_describe(ck[key])}"
    for key in ("epoch", "batch", "global_step"):
        if not _is_int(ck[key]) or ck[key] < 0:
            return key, f"expected an integer >= 0, got {_describe(ck[key])}"
    if not isinstance(ck["history"], list) or not all(isinstance(r, dict) for r in ck["history"]):
        return "history", f"expected a list of per-epoch dicts, got {_describe(ck['history'])}"
    if "wall_time" in ck and not (_is_number(ck["wall_time"]) and ck["wall_time"] >= 0):
        return "wall_time", f"expected a finite number of seconds >= 0, got {_describe(ck['wall_time'])}"
    for name, value in ck["model"].items():
        if not isinstance(value, torch.Tensor):
            return "model", f"{name}: expected a tensor, got {_describe(value)}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return "model", (f"{name} holds non-finite values (NaN or inf); rcl-train never saves "
                             "such a model, so the file was changed after it was written")
    problem = _check_partial(ck.get("epoch_partial"), ck["batch"])
    if problem:
        return "epoch_partial", problem
    problem = _check_rng(ck["rng"])
    if problem:
        return "rng", problem
    return None


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
    _verify_archive(path)
    bad = check_fields(ck)
    if bad:
        raise ValueError(f"--resume: {path}: field {bad[0]!r}: {bad[1]}")
    return ck
