"""Bad calls of the CUDA LSE ops, each in a child process (tests/test_cuda_wmma.py, test_cuda_mma.py).

On the first H100 run the d > MAX_D call killed the pytest process. A child runs the calls
named on its command line in order and prints a JSON line per call; if it dies, the parent records
the call and the signal and starts a new child for the calls after it, so every call gets a verdict.

A child script is `child_script(op_piece)`: SETUP (small CUDA inputs), SHARED_CALLS (the controls
and the argument checks every binding runs from csrc/cuda/lse_binding.h), the op's piece and LOOP.
The op's piece defines `fwd(**replaced)` and `bwd(**replaced)` (its forward and backward on SETUP's
inputs, any argument replaced by keyword; the shared calls use them) and adds its own calls with
`calls.update({...})`. The verdicts expected of the shared calls are CONTROL_ERRORS and
ARGUMENT_ERRORS.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap

SETUP = textwrap.dedent(r"""
    import json, sys
    import torch
    import rcl_kernels as rk
    import rcl_kernels._C  # noqa: F401

    ops = torch.ops.rcl_kernels
    dev = "cuda"
    randn = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    z, k = randn(4, 8), randn(6, 8)
    rl = torch.zeros(4, dtype=torch.long, device=dev)
    cl = torch.zeros(6, dtype=torch.long, device=dev)
    rb, cb = torch.zeros(4, device=dev), torch.zeros(6, device=dev)
    lse, g = torch.zeros(4, device=dev), torch.ones(4, device=dev)

    def cpu_op_error():
        return ops.streaming_lse_forward(z.cpu(), torch.randn(6, 9), rl.cpu(), cl.cpu(), rb.cpu(),
                                   cb.cpu(), 0, 1.0)
""")

# fwd and bwd are looked up when a call runs, after the op's piece has defined them.
SHARED_CALLS = textwrap.dedent(r"""
    calls = {
        # Controls: a C++ error from ATen's CUDA code, and one from this extension's CPU kernel,
        # after CUDA is initialized. If these die too, the process cannot survive any C++ throw.
        "control_aten_cuda_error": lambda: torch.mm(randn(2, 3), randn(4, 5)),
        "control_cpu_op_error": cpu_op_error,
        "z_on_cpu": lambda: fwd(z=z.cpu()),
        "k_dtype": lambda: fwd(k=k.double()),
        "k_feature_dim": lambda: fwd(k=randn(6, 9)),
        "row_labels_device": lambda: fwd(rl=rl.cpu()),
        "col_labels_shape": lambda: fwd(cl=cl[:-1]),
        "row_bias_dtype": lambda: fwd(rb=rb.double()),
        "z_dtype": lambda: fwd(z=z.int(), k=k.int()),
        "lse_dtype": lambda: bwd(lse=lse.double()),
    }
""")

LOOP = textwrap.dedent(r"""
    for name in sys.argv[1:]:
        print(json.dumps({"begin": name}), flush=True)
        try:
            calls[name]()
            torch.cuda.synchronize()
            error = None
        except Exception as e:  # noqa: BLE001  (the verdict is the message)
            error = f"{type(e).__name__}: {e}"
        print(json.dumps({"call": name, "error": error}), flush=True)
""")

# call -> regex its error must match (None: must succeed), for the calls of SHARED_CALLS.
CONTROL_ERRORS = {
    "control_aten_cuda_error": "cannot be multiplied",
    "control_cpu_op_error": "must share d",
}
ARGUMENT_ERRORS = {
    "z_on_cpu": "z must be a CUDA tensor",
    "k_dtype": "k must have z's dtype",
    "k_feature_dim": "k must have z's feature dim",
    "row_labels_device": "row_labels must be on z's device",
    "col_labels_shape": "col_labels must have shape",
    "row_bias_dtype": "row_bias must be",
    "z_dtype": "z must be float32, float64, bfloat16 or float16",
    "lse_dtype": "lse must be",
}


def child_script(op_piece: str) -> str:
    """The script of a child: SETUP, SHARED_CALLS, the op's piece (indented as written), LOOP."""
    return SETUP + SHARED_CALLS + textwrap.dedent(op_piece) + LOOP


def run_calls_in_subprocesses(script, names, timeout=300):
    """{call: ("error", message or None) | ("killed", signal name and stderr tail)}."""
    verdicts, pending = {}, list(names)
    while pending:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", script, *pending],
            capture_output=True, text=True, timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "begin" in record:
                started = record["begin"]
            else:
                verdicts[record["call"]] = ("error", record["error"])
                started = None
        if proc.returncode == 0:
            break
        what = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                else f"exit status {proc.returncode}")
        if started is None:  # died outside any call (setup or shutdown): nothing more to learn
            raise AssertionError(f"bad-call child {what} outside a call:\n{proc.stderr[-3000:]}")
        verdicts[started] = ("killed",
                             f"{what}\n{proc.stderr[-3000:]}{native_backtrace(script, started)}")
        pending = pending[pending.index(started) + 1:]
    return verdicts


def native_backtrace(script, call, timeout=300):
    """The C++ backtrace of `call` dying alone under gdb (when gdb is installed), for the report."""
    if shutil.which("gdb") is None:
        return "\n(no gdb for a native backtrace)"
    proc = subprocess.run(
        ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c",
         script, call], capture_output=True, text=True, timeout=timeout)
    out = proc.stdout
    return "\ngdb:\n" + out[max(0, out.find("received signal")):][:6000]  # innermost frames first


def check_calls(script, expected):
    """Runs the calls of `expected` (call -> regex its error must match, None: must succeed) in
    its order and fails naming every call whose verdict differs."""
    verdicts = run_calls_in_subprocesses(script, list(expected))
    failures = []
    for name, pattern in expected.items():
        kind, detail = verdicts[name]
        if kind == "killed":
            failures.append(f"{name}: the process was {detail}")
        elif pattern is None and detail is not None:
            failures.append(f"{name}: expected success, got {detail}")
        elif pattern is not None and (detail is None or not re.search(pattern, detail)):
            failures.append(f"{name}: expected an error matching {pattern!r}, got {detail}")
    assert not failures, "\n".join(failures)
