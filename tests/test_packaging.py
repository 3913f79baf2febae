"""The package as a stranger gets it: the sdist of the tracked files, a wheel built from that sdist
(no network, no build isolation, against the installed torch), installed into a fresh venv that
sees only that torch, then imported and run there. One extension build (the CPU kernels; the CUDA
sources are left out with RCL_KERNELS_CUDA=0, `make check-cuda` compiles them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import rcl_kernels
from rcl_kernels._version import check_torch, major_minor
from test_readme import usage_example

REPO = Path(__file__).resolve().parents[1]
# The build compiles the extension: 1-2 minutes on 2 idle cores, far more on a loaded machine.
BUILD_TIMEOUT_S = 1500
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
LICENSE_WARNING = re.compile(r"licen[cs]e.*(deprecat|warn)|(deprecat|warn).*licen[cs]e", re.I)


def test_version_is_single_sourced():
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "rcl_kernels._version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", rcl_kernels.__version__)


def test_import_refuses_another_torch_minor():
    check_torch("2.13.1", {"torch": "2.13.0+cpu"})  # same major.minor: fine
    check_torch("2.13.0", None)  # a source tree never built: kernels.contract says what is missing
    with pytest.raises(ImportError, match=r"built against torch 2\.12\.0, but torch 2\.13\.0 is "
                                          r"installed.*--no-build-isolation"):
        check_torch("2.13.0", {"torch": "2.12.0"})
    assert major_minor("2.14.0a0+git123") == (2, 14)
    with pytest.raises(ValueError, match="torch version"):
        major_minor("nightly")


def _run(cmd, log: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, **kwargs)
    log.append(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")
    assert proc.returncode == 0, log[-1][-5000:]
    return proc


def _tracked_files() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.split("\0") if p and (REPO / p).is_file())


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A clean copy of the tracked files; its sdist; a wheel from the sdist; a fresh venv with the
    wheel installed, whose only other packages are those of the venv running the tests (a .pth
    file puts its site-packages after the new venv's own)."""
    work = tmp_path_factory.mktemp("packaging")
    src, dist, venv = work / "src", work / "dist", work / "venv"
    files = _tracked_files()
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    env = {**os.environ, "PIP_NO_INDEX": "1", "RCL_KERNELS_CUDA": "0", "MAX_JOBS": "2"}
    log: list[str] = []
    # Without --sdist/--wheel, build makes the sdist and then the wheel from the unpacked sdist.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], log, env=env)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")

    _run([sys.executable, "-m", "venv", "--without-pip", venv], log)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                log).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(site, "outer-venv.pth").write_text("".join(f"{p}\n" for p in outer))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          wheel], log, env=env)
    return {"files": files, "src": src, "sdist": sdist, "wheel": wheel, "python": python,
            "venv": venv, "work": work, "log": "\n".join(log)}


def test_sdist_holds_every_source_and_the_license(package):
    with tarfile.open(package["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {p for p in package["files"] if p.startswith(("csrc/", "python/rcl_train/",
                                                           "examples/", "docs/"))
              or (p.startswith("rcl_kernels/") and p.endswith(".py"))}
    needed |= {"LICENSE", "README.md", "setup.py", "pyproject.toml"}
    assert needed <= names, sorted(needed - names)
    assert "rcl_kernels/_build_info.json" not in names  # each build records its own torch


def test_wheel_holds_license_build_record_and_extension(package):
    with zipfile.ZipFile(package["wheel"]) as whl:
        names = whl.namelist()
        info = json.loads(whl.read("rcl_kernels/_build_info.json"))
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(re.fullmatch(r"rcl_kernels/_C\..*\.so", n) for n in names)
    assert "License-Expression: MIT" in metadata
    assert f"Version: {rcl_kernels.__version__}\n" in metadata
    assert info["torch"] == torch.__version__ and info["cuda_kernels"] is False


def test_build_prints_no_license_warning(package):
    assert "Successfully built" in package["log"]
    warnings = [line for line in package["log"].splitlines() if LICENSE_WARNING.search(line)]
    assert not warnings, warnings


def _venv_run(package, args, **kwargs):
    return subprocess.run([package["python"], *args], capture_output=True, text=True,
                          timeout=600, cwd=package["work"], **kwargs)


def test_installed_wheel_imports_and_runs_the_examples(package):
    probe = ("import json, rcl_kernels as rk; print(json.dumps({'version': rk.__version__, "
             "'file': rk.__file__, 'cpu': rk.available_backends()['cpu']}))")
    proc = _venv_run(package, ["-c", probe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert found["version"] == rcl_kernels.__version__
    assert Path(found["file"]).is_relative_to(package["venv"])  # the wheel, not the checkout
    assert found["cpu"] is None  # the compiled kernels load

    readme = package["work"] / "readme_example.py"
    readme.write_text(usage_example((package["src"] / "README.md").read_text()))
    proc = _venv_run(package, [readme])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _venv_run(package, [package["src"] / "examples" / "train_bcl.py", "--steps", "5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "balanced accuracy" in proc.stdout


def test_installed_wheel_refuses_another_torch(package):
    proc = _venv_run(package, ["-c", "import torch; torch.__version__ = '2.99.0'; "
                                     "import rcl_kernels"])
    assert proc.returncode != 0
    assert f"built against torch {torch.__version__}, but torch 2.99.0 is installed" in proc.stderr
