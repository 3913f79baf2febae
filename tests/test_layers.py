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

# Module (path below rcl_kernels/, dotted) -> the package modules it may import (module level or
# inside functions), as dotted paths below rcl_kernels.
ALLOWED = {
    "__init__": {"_version", "dispatch", "functional", "modules"},
    "modules": {"functional", "_checks"},
    "functional": {"_dtypes", "_checks", "dispatch", "distributed", "fused", "reference"},
    "_checks": {"_dtypes"},
    # the dispatcher reads the registry: each backend's module and the candidate data
    "dispatch": {"_dtypes", "autotune", "kernels.cpu", "kernels.cuda", "kernels.triton",
                 "kernels.candidate"},
    # auto's timing runs the loss (functional) on candidates named by the dispatcher.
    "autotune": {"_version", "dispatch", "functional"},
    "fused": {"_dtypes"},
    "distributed": set(),
    "reference": set(),
    "_dtypes": set(),
    "_version": set(),
    # the command-line tools (python -m rcl_kernels.info / .selftest): they report on candidates
    "info": {"_version", "autotune", "dispatch", "kernels.contract"},
    "selftest": {"autotune", "dispatch"},
    # The kernel layer: only the dtype table and the compiled library from above.
    "kernels.__init__": set(),
    "kernels.contract": {"_C", "_dtypes"},
    "kernels.candidate": {"_dtypes", "kernels.contract"},
    "kernels.planner": set(),
    "kernels.tiled": {"kernels.contract", "kernels.planner"},
    "kernels.cpu": {"_dtypes", "kernels.candidate", "kernels.contract", "kernels.tiled"},
    "kernels.cuda": {"_dtypes", "kernels.candidate", "kernels.contract", "kernels.planner",
                     "kernels.tiled"},
    "kernels.triton.__init__": {"kernels.candidate", "kernels.contract", "kernels.triton.launch",
                                "kernels.triton.variants", "kernels.triton"},
    "kernels.triton.variants": set(),
    "kernels.triton.jit_helpers": {"kernels.triton"},
    "kernels.triton.forward": {"kernels.triton.jit_helpers"},
    "kernels.triton.two_pass": {"kernels.triton.jit_helpers"},
    "kernels.triton.one_pass": {"kernels.triton.jit_helpers"},
    "kernels.triton.configs": {"kernels.triton", "kernels.triton.forward",
                               "kernels.triton.one_pass", "kernels.triton.two_pass",
                               "kernels.triton.variants"},
    "kernels.triton.launch": {"kernels.planner", "kernels.triton", "kernels.triton.configs",
                              "kernels.triton.forward", "kernels.triton.variants"},
}

# What no kernel module may import: the dispatcher, the loss and the public API.
ABOVE_THE_KERNELS = {"__init__", "dispatch", "functional", "fused", "modules", "autotune",
                     "reference", "distributed", "_checks", "info", "selftest"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file, as dotted names; relative
    imports are resolved against the file's own package (its folders below the package root, or
    its folder's name outside it)."""
    return imported_modules_of_text(path, path.read_text())


def imported_modules_of_text(path: Path, text: str) -> set[str]:
    try:
        parts = ["rcl_kernels", *path.parent.relative_to(PACKAGE).parts]
    except ValueError:
        parts = [path.parent.name]
    names = set()
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y / from .. import x
                package = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    names.add(f"{package}.{node.module}")
                    names.update(f"{package}.{node.module}.{alias.name}" for alias in node.names)
                else:
                    names.update(f"{package}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_imports(path: Path) -> set[str]:
    """The package modules a file imports (dotted below rcl_kernels; a name imported from a module
    counts only when it is a module itself)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    modules |= {m.removesuffix(".__init__") for m in modules} | {"_C"}
    out = set()
    for name in imported_modules(path):
        if name.startswith("rcl_kernels."):
            name = name.removeprefix("rcl_kernels.")
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_every_package_module_has_a_rule():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(ALLOWED), "add the new module to ALLOWED (and to the README's layer table)"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_package_module_imports_only_the_layers_below(module):
    path = PACKAGE / (module.replace(".", "/") + ".py")
    # A package's own __init__ (kernels: a docstring) comes with any of its modules.
    packages = {"kernels", "kernels.triton"} & {m.rpartition(".")[0] for m in ALLOWED[module]}
    extra = package_imports(path) - ALLOWED[module] - packages - {module.removesuffix(".__init__")}
    assert not extra, f"rcl_kernels/{module}.py imports {sorted(extra)}"
    outside = {name for name in imported_modules(path) if name.split(".")[0] in ("rcl_train", "bench")}
    assert not outside, f"the package must not import the harness or the bench: {sorted(outside)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_never_import_the_dispatcher_or_the_public_api(path):
    """kernels/* sits below everything that chooses or calls it: a backend's module can be read,
    tested and replaced without the dispatcher, the loss or the public API."""
    above = {name for name in package_imports(path) if name.split(".")[0] in ABOVE_THE_KERNELS}
    assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"
    assert "rcl_kernels" not in imported_modules(path), "the public API (import rcl_kernels)"


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
                   "def f():\n    from . import dispatch\n")
    assert "rcl_kernels.fused" in imported_modules(bad)
    assert {"rcl_kernels.fused", "rcl_kernels.dispatch"} <= imported_modules(bad)
    kernel = PACKAGE / "kernels" / "triton" / "launch.py"
    text = "from ... import dispatch\nfrom ..planner import x\n"
    tree_names = imported_modules_of_text(kernel, text)
    assert "rcl_kernels.dispatch" in tree_names and "rcl_kernels.kernels.planner" in tree_names
