"""The package's version (the one source pyproject.toml reads) and the PyTorch it was built with.

setup.py writes `_build_info.json` beside this file when it builds the extension: the torch
version whose headers and libraries rcl_kernels._C was compiled and linked against, and whether
the CUDA kernels were compiled (for which architectures). The compiled library only loads with
the same torch major.minor (its C++ ABI and the dispatcher's symbols change between releases), so
`check_torch` refuses a different one at import with a message that says how to rebuild, instead
of the loader's undefined-symbol error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__version__ = "0.1.0"

BUILD_INFO = Path(__file__).with_name("_build_info.json")


def build_info() -> dict | None:
    """What setup.py recorded about the build, or None in a source tree that was never built."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except FileNotFoundError:
        return None


def major_minor(version: str) -> tuple[int, int]:
    """(2, 13) for "2.13.0+cpu", "2.13.0a0+git1234" or "2.13"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"torch version: expected MAJOR.MINOR[...], got {version!r}")
    return int(match[1]), int(match[2])


def check_torch(running: str, info: dict | None) -> None:
    """Raise ImportError when the build recorded in `info` used another torch major.minor than
    `running`; nothing to check without a record."""
    if info is None:
        return
    built = info["torch"]
    if major_minor(built) != major_minor(running):
        raise ImportError(
            f"rcl_kernels {__version__} was built against torch {built}, but torch {running} is "
            f"installed; its compiled kernels load only with torch "
            f"{'.'.join(map(str, major_minor(built)))}.x. Install that torch, or rebuild "
            f"rcl_kernels against this one: pip install --no-build-isolation --no-deps "
            f"--force-reinstall <its sdist or clone> (in a clone: pip install "
            f"--no-build-isolation -e .)")
