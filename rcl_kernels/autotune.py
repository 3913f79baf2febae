"""auto's measured choice: time the eligible candidates once per key, keep the fastest.

As cuDNN's benchmark mode and Triton's autotuner do, one level up (algorithms and kernels):
- **Key**: device model and capability, dtype, TF32, N/M/d in power-of-two buckets, the
  reduction, whether gradients are needed, and deterministic mode.
- **Eligible**: the candidates that passed `python -m rcl_kernels.selftest` on this device model;
  where no verdict exists, those our runs have timed on this device type (`Candidate.timed_on`:
  the untimed GPU variants need a passing self-test first; the Triton interpreter on the CPU is
  never timed). A verdict other than "pass" excludes a candidate, a timed one too.
- **First call**: each eligible candidate runs forward (+ backward when gradients are needed) on
  random inputs of the call's shape, once to warm up (compiles, autotunes). Then the candidates
  are timed in rounds, one call of each per round (wall clock, the device synchronized), so that
  a slow spell of a shared machine falls on all of them alike: at least TIMED_ROUNDS rounds, more
  while the rounds so far took under TIMING_BUDGET_S (a small shape gets many samples for little
  time). One far slower than the best after the first round is not timed again. The lowest
  median wins; it goes to memory and to the on-disk cache.
- **Cache**: one JSON file per (torch, triton, build) under RCL_KERNELS_CACHE_DIR, else
  $XDG_CACHE_HOME/rcl_kernels, else ~/.cache/rcl_kernels; written to a temporary file and
  os.replace'd, merged with the file's current content under a file lock, so concurrent processes
  keep each other's entries. A corrupt file is ignored with a warning (and rewritten).
- **Lookups before timing**, in order: the memory cache, the disk cache, the shipped table of this
  device model (rcl_kernels/tuning/<model>.json, written by bench/gpu_check.sh); the static order
  (dispatch.static_order) when none has an entry and timing is off or not allowed here.
- **No timing** inside torch.compile tracing (there: the memory cache, else the static order) or
  CUDA-graph capture.
- **Switch**: RCL_KERNELS_AUTOTUNE=0 (or set_enabled(False)) turns timing off; the lookups above
  stay. The default is on: the first call of a key costs a warm-up and at least three timed
  calls per eligible candidate (three on the CPU), once per machine, as the disk cache keeps it. Measured on a quiet 2-core AMD EPYC (AVX512), fp32, forward + backward: 0.15 s
  at N = 256, d = 128; 0.78 s at BCL's shape (N = 512, M = 1,512, d = 1024); 12 s at N = 4,096,
  d = 1024 (bench/results/cpu-auto-check.json). A training run pays it once per shape bucket.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

ENV = "RCL_KERNELS_AUTOTUNE"
CACHE_ENV = "RCL_KERNELS_CACHE_DIR"
FORMAT = 1
TABLES = Path(__file__).with_name("tuning")
# The reference materializes N x M matrices: above this estimate it is not timed (it was
# measured slower than the fused candidates far below it on every machine so far).
REFERENCE_TIMING_MAX_BYTES = 256 << 20
# A candidate whose first timed call is this many times the best first call is not repeated.
DROP_FACTOR = 3.0
# Rounds of timed calls: at least TIMED_ROUNDS, then more while all rounds so far took less than
# TIMING_BUDGET_S, up to MAX_ROUNDS.
TIMED_ROUNDS = 3
TIMING_BUDGET_S = 0.5
MAX_ROUNDS = 15

_enabled: bool | None = None  # set_enabled(); None: the environment decides
_memory: dict[tuple, str] = {}  # local key (no device model) -> candidate name


def set_enabled(flag: bool | None) -> None:
    """Turn timing on or off for this process (None: back to RCL_KERNELS_AUTOTUNE, default on)."""
    global _enabled
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag: expected a bool or None, got {type(flag).__name__}")
    _enabled = flag


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes", ""):
        return True
    _warn_once(f"rcl_kernels: {ENV}={value!r} is not one of 0/1/on/off/true/false; timing stays on")
    return True


def clear_memory() -> None:
    """Forget this process's choices (the disk cache stays)."""
    _memory.clear()
    _load.cache_clear()


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------
@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) and the ISA ATen uses, e.g. "AMD EPYC 9B14 AVX2"."""
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    import platform

    return f"{model or platform.processor() or platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


@functools.cache
def _cuda_model(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"


def device_model(device: torch.device) -> str:
    """What the timings of `device` depend on: its model (and capability, ISA)."""
    if device.type == "cuda":
        return _cuda_model(device.index if device.index is not None else torch.cuda.current_device())
    return cpu_model()


def slug(text: str) -> str:
    """"NVIDIA H100 80GB HBM3 sm90" -> "nvidia-h100-80gb-hbm3-sm90" (a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def bucket(n: int) -> int:
    """The power of two at or above n: sizes within a factor of two share a choice."""
    return 1 << max(0, int(n) - 1).bit_length()


def problem_key(problem, allow_tf32: bool) -> str:
    """The key of a choice on one device model (the shipped tables' key)."""
    needs_grad = problem.needs_grad if problem.needs_grad is not None else torch.is_grad_enabled()
    dtype = str(problem.dtype).removeprefix("torch.")
    return (f"{dtype}|tf32={int(allow_tf32)}|N{bucket(problem.rows)}|M{bucket(problem.columns)}"
            f"|d{bucket(problem.dim)}|{problem.reduction}|grad={int(needs_grad)}"
            f"|det={int(torch.are_deterministic_algorithms_enabled())}")


def _local_key(problem, allow_tf32: bool) -> tuple:
    """The memory cache's key: the device itself stands for its model within a process."""
    return (str(problem.device), problem_key(problem, allow_tf32))


# --------------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rcl_kernels"


def versions() -> dict[str, str]:
    """What the cache is keyed by: torch, triton and the build of rcl_kernels (its version and
    the compiled library's size and modification time)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any failure to import means "no triton"
        triton_version = "none"
    try:
        from ._version import __version__ as package_version
    except ImportError:
        package_version = "unknown"
    libraries = sorted(Path(__file__).parent.glob("_C*.so")) + sorted(Path(__file__).parent.glob("_C*.pyd"))
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libraries)
    build = f"{package_version}-{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"
    return {"torch": torch.__version__, "triton": triton_version, "build": build}


def cache_path() -> Path:
    v = versions()
    return cache_dir() / (slug(f"tuning-torch{v['torch']}-triton{v['triton']}-{v['build']}") + ".json")


def _read(path: Path) -> dict:
    """The cache file's content; {} when missing; {} with a warning when unreadable or corrupt."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        _warn_once(f"rcl_kernels: cannot read the tuning cache {path} ({error}); ignoring it")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expected an object with format {FORMAT}")
        for section in ("choices", "verdicts"):
            if not isinstance(data.get(section, {}), dict):
                raise ValueError(f"{section!r} is not an object")
    except ValueError as error:
        _warn_once(f"rcl_kernels: the tuning cache {path} is corrupt ({error}); ignoring it")
        return {}
    return data


@functools.cache
def _load(path: Path) -> dict:
    return _read(path)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock across processes (no lock where fcntl is missing: the
    merge below still keeps what it read)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_cache(section: str, device: str, entries: dict) -> None:
    """Merge `entries` into cache[section][device] on disk: read the current file under the lock,
    merge, write a temporary file beside it and os.replace it (readers never see half a file)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = _read(path) or {"format": FORMAT, "versions": versions()}
            data.setdefault(section, {}).setdefault(device, {}).update(entries)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as error:
        _warn_once(f"rcl_kernels: cannot write the tuning cache {path} ({error}); "
                   "choices stay in memory")
        return
    _load.cache_clear()


def cached(section: str, device: str) -> dict:
    """cache[section][device] as on disk ({} when none)."""
    return _load(cache_path()).get(section, {}).get(device, {})


def verdicts(device: str) -> dict[str, dict]:
    """The self-test's verdicts on a device model: candidate name -> {"verdict", "detail", ...}."""
    return cached("verdicts", device)


@functools.cache
def shipped_table(device: str) -> dict[str, str]:
    """The tuning table shipped for a device model (problem key -> candidate name), {} if none."""
    path = TABLES / f"{slug(device)}.json"
    if not path.exists():
        return {}
    data = _read(path)
    return {k: v["candidate"] if isinstance(v, dict) else v
            for k, v in data.get("choices", {}).get(device, {}).items()}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def _no_timing_here(device: torch.device) -> str | None:
    """Why timing must not run now, or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def prepare(candidate, problem, allow_tf32: bool) -> Callable[[], None]:
    """One call of `candidate` (forward, + backward when gradients are needed, the device
    synchronized) on random inputs of `problem`'s shape."""
    from .functional import contrastive_loss

    n, m, d = problem.rows, problem.columns, problem.dim
    gen = torch.Generator().manual_seed(0)
    classes = max(1, m - n) if m > n else max(1, n // 4)
    features = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    features = features.to(problem.device, problem.dtype)
    prototypes = None
    if m > n:
        prototypes = torch.nn.functional.normalize(torch.randn(m - n, d, generator=gen), dim=-1)
        prototypes = prototypes.to(problem.device, problem.dtype)
    labels = torch.randint(0, classes, (n,), generator=gen).to(problem.device)
    needs_grad = problem.needs_grad if problem.needs_grad is not None else torch.is_grad_enabled()
    features.requires_grad_(needs_grad)
    sync = torch.cuda.synchronize if problem.device.type == "cuda" else (lambda: None)

    def call():
        with torch.set_grad_enabled(needs_grad):
            loss = contrastive_loss(features, labels, prototypes, backend=candidate.name,
                                    reduction=problem.reduction, num_classes=classes)
            if needs_grad:
                torch.autograd.grad(loss.sum(), features)
        sync()

    return call


def _failed(candidate, error: Exception) -> None:
    _warn_once(f"rcl_kernels: autotune: {candidate.name} failed to run "
               f"({type(error).__name__}: {error}); not chosen")


def tune(problem, allow_tf32: bool, candidates: Iterable, prepare_fn: Callable = prepare,
         clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict[str, float]]:
    """Time `candidates` (the module docstring's rounds; each warmed up first, in the order given)
    and return the fastest's name with every candidate's median in milliseconds (a candidate that
    raised is reported and left out)."""
    calls = {}
    for candidate in candidates:
        try:
            call = prepare_fn(candidate, problem, allow_tf32)
            call()  # compiles, Triton's own autotuning, first-touch allocations
        except Exception as error:  # noqa: BLE001 - a failing candidate is not chosen
            _failed(candidate, error)
            continue
        calls[candidate.name] = (candidate, call)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    started, rounds = clock(), 0
    while calls and (rounds < TIMED_ROUNDS
                     or (rounds < MAX_ROUNDS and clock() - started < TIMING_BUDGET_S)):
        for name, (candidate, call) in list(calls.items()):
            try:
                start = clock()
                call()
                samples[name].append(clock() - start)
            except Exception as error:  # noqa: BLE001
                _failed(candidate, error)
                del calls[name], samples[name]
        rounds += 1
        if rounds == 1 and samples:
            first = min(times[0] for times in samples.values())
            calls = {n: c for n, c in calls.items() if samples[n][0] <= DROP_FACTOR * first}
    if not samples:
        raise RuntimeError("autotune: no candidate ran")
    medians = {name: statistics.median(times) for name, times in samples.items()}
    best = min(medians, key=medians.get)
    return best, {name: round(s * 1e3, 4) for name, s in medians.items()}


def timing_eligible(candidates: list, device: str, device_type: str) -> list:
    """The candidates that may be timed: a passing self-test verdict on the `device` model, or
    (without a verdict) timed by our runs on this `device_type`."""
    known = verdicts(device)
    out = []
    for c in candidates:
        verdict = known.get(c.name, {}).get("verdict")
        if verdict is not None and verdict != "pass":
            continue
        if verdict is None and device_type not in c.timed_on:
            continue
        out.append(c)
    return out


def choose(problem, allow_tf32: bool, eligible: list, order: list[str]):
    """auto's candidate among `eligible` (each can run `problem`), `order` the static order."""
    by_name = {c.name: c for c in eligible}
    static = next((by_name[n] for n in order if n in by_name), None) \
        or next(c for c in eligible if c.fused)
    if torch.compiler.is_compiling():
        # In a trace: the memory cache for concrete sizes (no file reads, no timing), else the
        # static order.
        sizes = (problem.rows, problem.columns, problem.dim)
        if all(type(x) is int for x in sizes):
            return by_name.get(_memory.get(_local_key(problem, allow_tf32)), static)
        return static
    local = _local_key(problem, allow_tf32)
    name = _memory.get(local)
    if name in by_name:
        return by_name[name]
    device = device_model(problem.device)
    key = problem_key(problem, allow_tf32)
    entry = cached("choices", device).get(key)
    name = entry.get("candidate") if isinstance(entry, dict) else None
    if name not in by_name:
        name = shipped_table(device).get(key)
    timing_off = _no_timing_here(problem.device)
    if name not in by_name and enabled() and timing_off is None:
        name = _tune_and_store(problem, allow_tf32, eligible, order, device, key)
    chosen = by_name.get(name, static)
    if timing_off is None:  # capture: the next eager call may still time
        _memory[local] = chosen.name
    return chosen


def _tune_and_store(problem, allow_tf32, eligible, order, device, key) -> str | None:
    from .dispatch import reference_bytes

    small = reference_bytes(problem.rows, problem.columns, problem.dtype) <= REFERENCE_TIMING_MAX_BYTES
    timed = [c for c in timing_eligible(eligible, device, problem.device.type) if c.fused or small]
    timed.sort(key=lambda c: order.index(c.name) if c.name in order else len(order))
    if len(timed) < 2:
        return timed[0].name if timed else None
    name, times = tune(problem, allow_tf32, timed)
    update_cache("choices", device, {key: {
        "candidate": name, "ms": times, "shape": [problem.rows, problem.columns, problem.dim],
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }})
    return name


# --------------------------------------------------------------------------------------------------
# A tuning table for a device model (bench/gpu_check.sh ships it as rcl_kernels/tuning/<model>.json)
# --------------------------------------------------------------------------------------------------
def write_table(path: str, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype],
                device: torch.device, grads=(True,), reduction: str = "mean") -> dict:
    """Tune every (N, d, C) shape (M = N + C) and dtype on `device` (fp32 at the current matmul
    precision) and write the choices to `path` in the shipped tables' format; returns them."""
    from .dispatch import Problem, choose_auto

    previous = _enabled
    set_enabled(True)
    model = device_model(device)
    choices = {}
    try:
        for n, d, c in shapes:
            for dtype in dtypes:
                for grad in grads:
                    problem = Problem(device, dtype, n, n + c, d, reduction, grad)
                    allow_tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
                    chosen = choose_auto(problem, "auto", allow_tf32)
                    key = problem_key(problem, allow_tf32)
                    entry = cached("choices", model).get(key) or {"candidate": chosen.name}
                    choices[key] = {**entry, "candidate": chosen.name}
                    print(f"{model} {key}: {chosen.name} {entry.get('ms', '')}", flush=True)
    finally:
        set_enabled(previous)
    data = {"format": FORMAT, "versions": versions(), "choices": {model: choices}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return choices


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rcl_kernels.autotune",
                                     description="Tune auto's choice at given shapes and write a "
                                                 "tuning table for this device model.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", required=True, metavar="N:d:C")
    parser.add_argument("--dtypes", nargs="+", default=["float32"],
                        choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--table", metavar="FILE",
                        help="where to write the table (default rcl_kernels/tuning/<model>.json)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments only")
    args = parser.parse_args(argv)
    shapes = []
    for item in args.shapes:
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--shapes: expected N:d:C with positive integers, got {item!r}")
        shapes.append(tuple(map(int, parts)))
    if args.dry_run:
        print(f"autotune: {len(shapes)} shapes x {len(args.dtypes)} dtypes on {args.device}: ok")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch reports no usable CUDA device")
    device = torch.device(args.device)
    table = args.table or str(TABLES / f"{slug(device_model(device))}.json")
    write_table(table, shapes, [getattr(torch, d) for d in args.dtypes], device)
    print(f"wrote {table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
