"""Output directories (--out, --tensorboard): created up front, or refused with the reason."""

from __future__ import annotations

import os
import tempfile

from .errors import error_reason


def _file_above(path: str) -> str | None:
    """The nearest existing ancestor of `path` when it is a file, not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def prepare_out_dir(path: str, flag: str = "--out") -> None:
    """Create `path` (and its parents) and check that a file can be written there; a ValueError
    naming `flag` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: an existing file, not a directory")
    above = _file_above(path)
    if above is not None:
        raise ValueError(f"{flag} {path}: lies under {above}, which is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({error_reason(e)})") from e
