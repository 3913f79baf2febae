"""What rcl_kernels can run here, and why not the rest (as `python -m xformers.info` does):

    python -m rcl_kernels.info

versions (Python, torch, triton, CUDA, the compiler), the build (the compiled ops, the CUDA
architectures, the CPU ISA ATen uses), the devices, every candidate (backend, algorithm,
variant) with its availability or the reasons it is refused, the self-test's verdicts and the
tuning cache and shipped table in use.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import torch

from . import autotune
from .kernels import contract
from ._version import __version__, build_info
from .dispatch import BACKENDS, Problem, all_candidates

_OPS = ("streaming_lse", "tiled_lse", "wmma_lse", "mma_lse")


def _compiler() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc not on PATH"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{nvcc} ({error})"
    return f"{nvcc} ({out.strip().splitlines()[-1] if out.strip() else 'no version'})"


def _triton_version() -> str:
    try:
        import triton
    except Exception as error:  # noqa: BLE001 - any import failure is "unavailable"
        return f"unavailable ({type(error).__name__}: {error})"
    return triton.__version__


def sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """The report as (section, [(name, value)]) pairs."""
    out = []
    out.append(("versions", [
        ("rcl_kernels", __version__),
        ("python", sys.version.split()[0]),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("triton", _triton_version()),
        ("compiler", _compiler()),
    ]))
    info = build_info() or {}
    compiled = []
    if contract.EXTENSION_ERROR is None:
        for op in _OPS:
            keys = [k for k in ("CPU", "CUDA") if contract.compiled_kernel_for(f"{op}_forward", k)]
            compiled.append((f"{op}_*", "/".join(keys) or "schema only (no kernel compiled)"))
    else:
        compiled.append(("rcl_kernels._C", contract.EXTENSION_ERROR))
    out.append(("build", [
        ("built against torch", str(info.get("torch", "unknown (no build record)"))),
        ("CUDA kernels", str(info.get("cuda_kernels", "unknown"))),
        ("CUDA archs", str(info.get("cuda_archs") or "none")),
        ("torch CUDA archs", " ".join(torch.cuda.get_arch_list()) or "none"),
        ("CPU ISA in use", torch.backends.cpu.get_cpu_capability()),
        *compiled,
    ]))
    devices = [("cpu", f"{autotune.cpu_model()}, {torch.get_num_threads()} threads, "
                       f"{platform.machine()}")]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        devices.append((f"cuda:{index}", autotune.device_model(torch.device("cuda", index))))
    if len(devices) == 1:
        devices.append(("cuda", "none (torch.cuda.is_available() is False)"))
    out.append(("devices", devices))

    rows = []
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    verdicts = {d: autotune.verdicts(autotune.device_model(torch.device(d))) for d in device_types}
    for backend, candidate in all_candidates():
        states = []
        for device_type in backend.device_types:
            if device_type != "cpu" and device_type not in device_types:
                states.append(f"{device_type}: no device")
                continue
            dtype = torch.float32 if torch.float32 in backend.dtypes else backend.dtypes[0]
            reasons = backend.candidate_not_supported_reasons(
                Problem(torch.device(device_type), dtype, 8, 8, 16), candidate)
            verdict = verdicts.get(device_type, {}).get(candidate.name, {}).get("verdict")
            if reasons:
                states.append(f"{device_type}: refused ({'; '.join(reasons)})")
            else:
                states.append(f"{device_type}: available, self-test {verdict or 'not run'}")
        flags = [candidate.algorithm or "materializes N x M",
                 "deterministic" if candidate.deterministic else "NOT deterministic",
                 f"timed on {'/'.join(candidate.timed_on)}" if candidate.timed_on else "never timed"]
        rows.append((candidate.name, f"[{', '.join(flags)}] " + " | ".join(states)))
    out.append(("candidates", rows))

    overrides = [(b.variant_variable[0], f"{b.variant_override()} ({b.name}'s default streaming variant)")
                 for b in BACKENDS.values() if b.variant_variable is not None]
    cache = autotune.cache_path()
    choices = {d: autotune.cached("choices", autotune.device_model(torch.device(d))) for d in device_types}
    tables = {d: autotune.TABLES / f"{autotune.slug(autotune.device_model(torch.device(d)))}.json"
              for d in device_types}
    out.append(("tuning", [
        ("autotune", f"{'on' if autotune.enabled() else 'off'} ({autotune.ENV}=0 or "
                     "rcl_kernels.autotune.set_enabled(False) turns timing off)"),
        ("cache file", f"{cache} ({'exists' if cache.exists() else 'not written yet'})"),
        *[(f"cached choices ({d})", str(len(c))) for d, c in choices.items()],
        *[(f"shipped table ({d})", f"{t.name} ({'present' if t.exists() else 'none for this model'})")
          for d, t in tables.items()],
        *overrides,
    ]))
    return out


def main() -> int:
    for title, rows in sections():
        print(f"{title}:")
        width = max((len(name) for name, _ in rows), default=0)
        for name, value in rows:
            print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
