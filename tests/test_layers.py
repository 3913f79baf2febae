"""The import rules of the architecture (README, "Architecture"), read from the source with ast:
each module of the package imports only the layers below it, the reference imports no kernel, and
the harness and the benchmarks use only the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rcl_kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rcl_kernels"

# Module -> the package modules it may import (module level or inside functions).
ALLOWED = {
    "__init__": {"_version", "backends", "functional", "modules"},
    "modules": {"functional", "_validation"},
    "functional": {"_dtypes", "_validation", "backends", "distributed", "fused", "reference"},
    "_validation": {"_dtypes"},
    "backends": {"_dtypes", "_kernel_calls", "_ops", "autotune", "triton_lse"},
    # auto's timing runs the loss (functional) on candidates named by backends.
    "autotune": {"_version", "backends", "functional"},
    "_kernel_calls": {"_ops", "planner"},
    "fused": {"_dtypes"},
    "_ops": {"_C", "_dtypes", "triton_lse"},
    "planner": set(),
    "triton_lse": {"planner"},
    "distributed": set(),
    "reference": set(),
    "_dtypes": set(),
    "_version": set(),
    # the command-line tools (python -m rcl_kernels.info / .selftest): they report on candidates
    "info": {"_ops", "_version", "autotune", "backends"},
    "selftest": {"autotune", "backends"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file, as dotted names; relative
    imports are resolved against the file's own package (its folder's name)."""
    package = path.parent.name
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y
                if node.module:
                    names.add(f"{package}.{node.module}")
                else:
                    names.update(f"{package}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_imports(path: Path) -> set[str]:
    return {name.split(".")[1] for name in imported_modules(path) if name.startswith("rcl_kernels.")}


def test_every_package_module_has_a_rule():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(ALLOWED), "add the new module to ALLOWED (and to the README's layer table)"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_package_module_imports_only_the_layers_below(module):
    path = PACKAGE / f"{module}.py"
    extra = package_imports(path) - ALLOWED[module]
    assert not extra, f"rcl_kernels/{module}.py imports {sorted(extra)}"
    outside = {name for name in imported_modules(path) if name.split(".")[0] in ("rcl_train", "bench")}
    assert not outside, f"the package must not import the harness or the bench: {sorted(outside)}"


def test_reference_imports_no_kernel():
    modules = {name for name in imported_modules(PACKAGE / "reference.py") if not name.startswith("__future__")}
    assert modules <= {"torch"}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


# Kernel tools, not benchmarks of the loss: they compile (SASS, registers) and time the Triton
# kernels one config at a time, which only the kernel module can offer.
KERNEL_TOOLS = {"bench/triton_sass.py", "bench/triton_configs.py"}


@pytest.mark.parametrize(
    "path",
    [p for p in python_files("python", "bench") if str(p.relative_to(ROOT)) not in KERNEL_TOOLS],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_harness_and_bench_use_only_the_public_api(path):
    public = {f"rcl_kernels.{name}" for name in rcl_kernels.__all__}
    internal = {
        name for name in imported_modules(path)
        if name.startswith("rcl_kernels.") and name not in public
    }
    assert not internal, f"{path.relative_to(ROOT)} imports rcl_kernels internals {sorted(internal)}"


def test_the_rules_catch_an_internal_import(tmp_path):
    """The checks above would fail on a violation (a test that cannot fail is no test)."""
    bad = tmp_path / "rcl_kernels" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import torch\nfrom rcl_kernels.fused import per_anchor_loss\n"
                   "def f():\n    from . import triton_lse\n")
    assert "rcl_kernels.fused" in imported_modules(bad)
    assert package_imports(bad) == {"fused", "triton_lse"}
