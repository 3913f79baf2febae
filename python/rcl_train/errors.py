"""The harness's errors: what the CLI turns into an `rcl-train: error:` line and an exit status."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """Training diverged (a non-finite loss, gradient or parameter); the last checkpoint is kept."""


class OutputError(RuntimeError):
    """The run's output could not be written (a full disk, a failing write); the last good
    checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume."""


def error_reason(e: BaseException, limit: int = 200) -> str:
    """'Type: message' on one line, cut to `limit` characters (torch's messages run long)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return type(e).__name__ + (": " + text[:limit] if text else "")
