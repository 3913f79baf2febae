"""Every available candidate against the float64 oracle on this machine's devices.

    python -m rcl_kernels.selftest [--device cpu|cuda|all] [--candidates NAME ...] [--timeout S]

Each candidate runs in its own subprocess with a timeout, so a crash or a hang is a verdict, not
a dead test run. A candidate passes when, on every case of the grid (odd sizes, every dtype its
backend takes, the three reductions, logit biases, margins, class averaging, anchors without a
positive), its error on the loss and on every gradient is at most 2x the error of the reference
run in the same dtype on the same device, plus a small floor (DESIGN §4), errors measured as
relative norms against the reference in float64 on the CPU. The verdicts go to the tuning cache
(rcl_kernels.autotune), where auto reads which candidates may be timed. Exit status 0 when every
candidate passed, 1 otherwise, 2 on a usage error.

The reference is the oracle and is not tested against itself. The Triton kernels on the CPU run
only through Triton's interpreter (a debugging mode, minutes per candidate): --interpreted adds
them. --plugin FILE runs a Python file first, in this process and in each child (it may register
extra candidates with rcl_kernels.dispatch.register_candidate; the tests' deliberately wrong
candidate comes this way).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

# Absolute floors of the rule: err(candidate) <= 2·err(reference in the same dtype) + floor.
FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
DEFAULT_TIMEOUT_S = 300.0
_RESULT = "selftest-result: "


def relative_error(value: torch.Tensor, truth: torch.Tensor, magnitude: float = 0.0) -> float:
    """‖value − truth‖ / max(‖truth‖, magnitude) over all entries (absolute when both are zero).

    `magnitude` is the size of the terms that cancel into `truth`: a loss is a difference of
    logit-sized terms (log-sum-exp minus the positives' mean), so a loss of 0.01 from logits of
    size 10 carries absolute errors of order eps·10 in any dtype and any order of summation."""
    value, truth = value.double().cpu(), truth.double().cpu()
    scale = max(truth.norm().item(), magnitude)
    return (value - truth).norm().item() / (scale if scale > 0 else 1.0)


def rule_check(value, low_precision_reference, truth, dtype, magnitude=0.0,
               floor: float | None = None) -> tuple[float, float]:
    """(error, allowed) of the FlashAttention rule: at most 2x the error of the reference run in
    the same dtype, plus a small floor (FLOORS[dtype] unless a caller names another, with its
    reason). Passing means error <= allowed (NaN never passes)."""
    err = relative_error(value, truth, magnitude)
    allowed = 2 * relative_error(low_precision_reference, truth, magnitude)
    return err, allowed + (FLOORS[dtype] if floor is None else floor)


@dataclass(frozen=True)
class Case:
    """One input: B·V anchors of width d, C classes, a label draw and the loss's knobs."""

    batch: int
    views: int
    dim: int
    classes: int
    draw: str  # uniform | longtail | distinct (no anchor has a positive) | one_class
    prototypes: bool
    class_averaging: bool
    bias: bool  # a logit bias per class (RCL's Balanced-Softmax prior)
    margins: bool
    reduction: str
    feature_scale: float = 1.0

    def __str__(self):
        knobs = [k for k in ("prototypes", "class_averaging", "bias", "margins") if getattr(self, k)]
        return (f"N={self.batch * self.views} d={self.dim} C={self.classes} {self.draw} "
                f"{'+'.join(knobs) or 'plain'} {self.reduction}")


GRID = (
    Case(1, 1, 20, 1, "uniform", False, False, False, False, "mean"),  # one anchor, no positive
    Case(3, 1, 20, 5, "distinct", False, False, False, False, "none"),  # no anchor has a positive
    Case(3, 1, 130, 5, "distinct", True, True, False, False, "mean"),  # only prototypes positive
    Case(17, 1, 20, 1, "one_class", True, True, True, True, "sum"),  # C = 1: all positive
    Case(17, 2, 130, 40, "longtail", True, True, True, True, "mean", 1.2),  # RCL
    Case(9, 2, 33, 6, "uniform", False, False, True, True, "none", 1.1),  # RCL without prototypes
    Case(129, 1, 20, 7, "longtail", False, False, False, False, "sum"),  # SupCon, odd N
    Case(20, 2, 64, 300, "uniform", True, True, False, False, "mean"),  # M >> N
)
# On a GPU, sizes past one tile in every direction and d beyond the one-pass limit.
GPU_GRID = (
    Case(300, 2, 256, 100, "longtail", True, True, True, True, "mean", 1.2),
    Case(257, 1, 1024, 33, "uniform", True, False, False, False, "none"),
)


def _labels(case: Case, gen: torch.Generator) -> torch.Tensor:
    n = case.batch
    if case.draw == "distinct":
        return torch.randperm(max(case.classes, n), generator=gen)[:n] % case.classes
    if case.draw == "one_class":
        return torch.zeros(n, dtype=torch.long)
    if case.draw == "longtail":
        weights = 0.01 ** (torch.arange(case.classes, dtype=torch.float64) / max(case.classes - 1, 1))
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    return torch.randint(0, case.classes, (n,), generator=gen)


def _run(case: Case, inputs: dict, backend: str, dtype: torch.dtype, device: str):
    """(loss, gradients) of one backend on `inputs` cast to dtype and device."""
    import rcl_kernels as rk

    features = inputs["features"].to(device, dtype).requires_grad_()
    prototypes = inputs["prototypes"]
    if prototypes is not None:
        prototypes = prototypes.to(device, dtype).requires_grad_()
    table = {k: (None if inputs[k] is None else inputs[k].to(device, dtype))
             for k in ("logit_bias", "margins")}
    labels = inputs["labels"].to(device)
    loss = rk.contrastive_loss(
        features, labels, prototypes, temperature=0.1, feature_scale=case.feature_scale,
        class_averaging=case.class_averaging, reduction=case.reduction, backend=backend,
        num_classes=case.classes, **table)
    upstream = inputs["upstream"] if case.reduction == "none" else torch.ones((), dtype=torch.float64)
    leaves = [t for t in (features, prototypes) if t is not None]
    grads = torch.autograd.grad(loss, leaves, upstream.to(device, loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return loss.detach(), [g.detach() for g in grads]


def check_candidate(name: str, device: str, cases=None, seed: int | None = None) -> dict:
    """Run the grid on one candidate; {"verdict": "pass"|"fail", "cases": n, "failures": [...],
    "worst": ratio of error to allowed}."""
    from .dispatch import Problem, find_candidate

    backend, candidate = find_candidate(name)
    if cases is None:
        cases = GRID + (GPU_GRID if device == "cuda" else ())
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    failures, worst, count = [], 0.0, 0
    for case in cases:
        n = case.batch * case.views
        m = n + (case.classes if case.prototypes else 0)
        features = torch.nn.functional.normalize(
            torch.randn(case.batch, case.views, case.dim, generator=gen, dtype=torch.float64), dim=-1)
        labels = _labels(case, gen)
        inputs = {
            "features": features, "labels": labels,
            "prototypes": torch.nn.functional.normalize(torch.randn(
                case.classes, case.dim, generator=gen, dtype=torch.float64), dim=-1)
            if case.prototypes else None,
            "logit_bias": torch.rand(case.classes, generator=gen, dtype=torch.float64).log()
            if case.bias else None,
            "margins": 0.3 * torch.rand(case.classes, generator=gen, dtype=torch.float64)
            if case.margins else None,
            "upstream": torch.randn(n, generator=gen, dtype=torch.float64),
        }
        truth = _run(case, inputs, "reference", torch.float64, "cpu")
        for dtype in backend.dtypes:
            problem = Problem(torch.device(device), dtype, n, m, case.dim, case.reduction, True)
            if backend.candidate_not_supported_reasons(problem, candidate):
                continue
            count += 1
            low = _run(case, inputs, "reference", dtype, device)
            try:
                got = _run(case, inputs, name, dtype, device)
            except Exception as error:  # noqa: BLE001 - an error is the candidate's verdict
                failures.append(f"{case} {dtype}: raised {type(error).__name__}: {error}")
                continue
            scale = case.feature_scale**2 / 0.1
            parts = [("loss", got[0], low[0], truth[0], scale)]
            parts += [(f"grad[{i}]", g, lo, t, 0.0)
                      for i, (g, lo, t) in enumerate(zip(got[1], low[1], truth[1]))]
            for what, value, reference, exact, magnitude in parts:
                err, allowed = rule_check(value, reference, exact, dtype, magnitude)
                ratio = err / allowed if err == err else float("inf")
                worst = max(worst, ratio)
                if not ratio <= 1.0:
                    failures.append(f"{case} {str(dtype).removeprefix('torch.')} {what}: relative "
                                    f"error {err:.3e} > allowed {allowed:.3e}")
    return {"verdict": "fail" if failures or count == 0 else "pass", "cases": count,
            "worst": round(worst, 4), "seed": seed,
            "failures": failures[:10] or ([] if count else ["no case of the grid could run"])}


# --------------------------------------------------------------------------------------------------
# The parent: one subprocess per candidate and device.
# --------------------------------------------------------------------------------------------------
def candidates_to_test(device: str, interpreted: bool = False) -> tuple[list[str], dict[str, str]]:
    """(names to test on `device`, name -> why not for the others)."""
    from .dispatch import Problem, all_candidates

    names, skipped = [], {}
    for backend, candidate in all_candidates():
        if not candidate.fused:
            continue
        dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
        problem = Problem(torch.device(device), dtype, 8, 8, 16)
        reasons = backend.device_reasons(problem) + [
            r for r in backend.candidate_reasons(problem, candidate) if "feature dims" not in r]
        if reasons:
            skipped[candidate.name] = "; ".join(reasons)
        elif backend.name == "triton" and device == "cpu" and not interpreted:
            skipped[candidate.name] = "Triton's interpreter on the CPU (add --interpreted)"
        else:
            names.append(candidate.name)
    return names, skipped


def run_child(name: str, device: str, timeout: float, plugins: list[str]) -> dict:
    """The verdict of one candidate from its own process: its result, or "crash"/"timeout"."""
    command = [sys.executable, "-m", "rcl_kernels.selftest", "--child", name, "--device", device]
    for plugin in plugins:
        command += ["--plugin", plugin]
    start = time.monotonic()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"verdict": "timeout", "failures": [f"no result within {timeout:g} s (a hang?)"],
                "seconds": round(time.monotonic() - start, 1)}
    seconds = round(time.monotonic() - start, 1)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(_RESULT):
            return {**json.loads(line[len(_RESULT):]), "seconds": seconds}
    how = (f"killed by signal {-out.returncode}" if out.returncode < 0
           else f"exit status {out.returncode}")
    tail = " | ".join(out.stderr.strip().splitlines()[-3:])
    return {"verdict": "crash", "failures": [f"{how}, no result ({tail})"], "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rcl_kernels.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="devices to test on (all: the CPU and, when present, CUDA)")
    parser.add_argument("--candidates", nargs="+", metavar="NAME",
                        help="only these candidates (e.g. cpu:tiled triton:one-pass)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds per candidate (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--interpreted", action="store_true",
                        help="also the Triton kernels on the CPU, through Triton's interpreter")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a Python file run first here and in each child")
    parser.add_argument("--no-record", action="store_true",
                        help="do not write the verdicts to the tuning cache")
    parser.add_argument("--json", metavar="FILE", help="also write the verdicts to FILE")
    parser.add_argument("--jobs", type=int, default=1,
                        help="candidates tested at once (default 1; a GPU machine's cores compile "
                             "several candidates' kernels at once)")
    parser.add_argument("--check-args", action="store_true", help="check the arguments, run nothing")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout: expected seconds > 0, got {args.timeout:g}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected an int >= 1, got {args.jobs}")
    for plugin in args.plugin:
        if not os.path.isfile(plugin):
            parser.error(f"--plugin: no such file {plugin!r}")
        runpy.run_path(plugin, run_name="rcl_kernels_selftest_plugin")
    if args.check_args:
        print(f"  ok: selftest on {args.device}, {args.timeout:g} s per candidate, {args.jobs} at once")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch reports no usable CUDA device")

    if args.child:
        if args.device == "all":
            parser.error("--child needs --device cpu or cuda")
        result = check_candidate(args.child, args.device)
        print(_RESULT + json.dumps(result), flush=True)
        return 0

    from . import autotune
    from .dispatch import candidate_names

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if args.candidates:
        unknown = [n for n in args.candidates if n not in candidate_names()]
        if unknown:
            parser.error(f"--candidates: unknown {', '.join(unknown)}; known: {', '.join(candidate_names())}")
    results, failed = {}, False
    for device in devices:
        model = autotune.device_model(torch.device(device))
        names, skipped = candidates_to_test(device, args.interpreted)
        if args.candidates:
            skipped = {n: r for n, r in skipped.items() if n in args.candidates}
            missing = [n for n in args.candidates if n not in names and n not in skipped]
            skipped.update({n: f"not a candidate on {device}" for n in missing})
            names = [n for n in names if n in args.candidates]
        print(f"self-test on {device} ({model}): {len(names)} candidate(s), {args.timeout:g} s each")
        verdicts = {}
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {name: pool.submit(run_child, name, device, args.timeout, args.plugin)
                       for name in names}
        for name in names:
            result = verdicts[name] = futures[name].result()
            failed |= result["verdict"] != "pass"
            detail = (f"{result.get('cases', 0)} cases, worst error {result.get('worst', '-')} of "
                      f"the allowed" if result["verdict"] == "pass" else "; ".join(result["failures"][:3]))
            print(f"  {name:28s} {result['verdict']:8s} {result['seconds']:6.1f} s  {detail}", flush=True)
        for name, reason in skipped.items():
            print(f"  {name:28s} {'skipped':8s} {'':8s}  {reason}")
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if verdicts and not args.no_record:
            autotune.update_cache("verdicts", model, {
                n: {"verdict": r["verdict"], "detail": "; ".join(r["failures"][:3]), "when": when}
                for n, r in verdicts.items()})
        results[device] = {"model": model, "verdicts": verdicts, "skipped": skipped}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not args.no_record:
        print(f"verdicts recorded in {autotune.cache_path()}")
    print("self-test:", "FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
