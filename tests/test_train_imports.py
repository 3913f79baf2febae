"""The harness (python/rcl_train) uses rcl_kernels through its public API only: `import rcl_kernels`
(no submodule, no `from rcl_kernels import _private`), and only names in rcl_kernels.__all__."""

from __future__ import annotations

import ast
import os

import rcl_kernels

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python",
                       "rcl_train")


def _sources():
    for name in sorted(os.listdir(HARNESS)):
        if name.endswith(".py"):
            path = os.path.join(HARNESS, name)
            with open(path) as f:
                yield path, ast.parse(f.read(), path)


def test_harness_imports_only_the_public_rcl_kernels_api():
    public = set(rcl_kernels.__all__)
    seen = set()
    for path, tree in _sources():
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "rcl_kernels":
                        assert a.name == "rcl_kernels", f"{path}: import {a.name}"
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rcl_kernels"):
                assert node.module == "rcl_kernels", f"{path}: from {node.module} import ..."
                bad = [a.name for a in node.names if a.name not in public]
                assert not bad, f"{path}: from rcl_kernels import {bad} (not public)"
                seen.update(a.name for a in node.names)
        for node in ast.walk(tree):  # rk.name and self.rk.name
            holder = node.value if isinstance(node, ast.Attribute) else None
            name = (holder.id if isinstance(holder, ast.Name)
                    else holder.attr if isinstance(holder, ast.Attribute) else None)
            if name in aliases:
                assert node.attr in public, f"{path}:{node.lineno}: rcl_kernels.{node.attr} is not public"
                seen.add(node.attr)
    # the check saw the losses the harness really uses (so it does not pass by finding nothing)
    assert {"bcl_loss", "rcl_loss", "supcon_loss", "logit_adjusted_cross_entropy"} <= seen
