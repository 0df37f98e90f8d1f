"""A regular (non-editable) install is a complete pyvmm.

The wheel is built from a copy of the working tree (as `pip install .` from a clean
clone would), installed into a fresh virtual environment outside the checkout, and
pyvmm is run from there with the working directory elsewhere: the package must carry
everything it needs at run time (the shim, the guest sources as ``vmm/guests``). The
kernel build cache is shared with the rest of the suite (same inputs, same key).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import requires_kvm

REPO = Path(__file__).resolve().parents[2]

#: What must be inside the wheel besides vmm/*.py (paths relative to its root).
REQUIRED = [
    "vmm/guests/linux/pyvmm.config",
    "vmm/guests/linux/patches/0001-x86-mm-run-syscalls-that-fault-at-entry_SYSCALL_64.patch",
    "vmm/guests/initramfs/init",
    "vmm/guests/agent/agent.c",
    "vmm/guests/tiny/hello.S",
    "vmm/guests/tiny/tiny.h",
    "vmm/guests/tiny/virtio_mmio.h",
    "vmm/guests/tiny/link.ld",
    "vmm/guests/tiny/blkbench.c",
    "vmm/guests/probes/avxstate.c",
]

_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis", "*.so", "_shim.c", "*.pyc")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE, symlinks=True)
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp / "dist", src])
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    out = (p.stdout + p.stderr).decode(errors="replace")
    # setuptools' deprecation warnings (e.g. the license table) are build noise users see.
    assert "SetuptoolsDeprecationWarning" not in out, out[-3000:]
    wheels = list((tmp / "dist").glob("pyvmm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel (and its dependencies) installed; returns its bin/."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    p = _run([sys.executable, "-m", "venv", env_dir])
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    p = _run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return env_dir / "bin"


def _outside(tmp_path) -> dict:
    """Run from a directory outside the checkout, with nothing of the checkout on the
    import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {"cwd": tmp_path, "env": env}


@pytest.mark.timeout(900)
def test_wheel_carries_guests_shim_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n) for n in names if n.endswith(".dist-info/METADATA")).decode()
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, f"missing from the wheel: {missing}"
    assert any(n.startswith("vmm/_shim") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata
    # Every guest source of the tree is in the wheel (nothing forgotten by a glob).
    tree = {f"vmm/guests/{p.relative_to(REPO / 'guests')}" for p in (REPO / "guests").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert tree <= names, sorted(tree - names)


@requires_kvm
@pytest.mark.timeout(900)
def test_installed_pyvmm_boots_a_tiny_guest(venv, tmp_path):
    kw = _outside(tmp_path)
    p = _run([venv / "python", "-c", "import vmm, vmm.paths; print(vmm.__file__); "
              "print(vmm.paths.guests_dir())"], **kw)
    assert p.returncode == 0, p.stderr.decode()
    module, guests = p.stdout.decode().split()
    assert Path(module).is_relative_to(venv.parent), module
    assert Path(guests).is_relative_to(venv.parent), guests
    p = _run([venv / "python", "-c", "from vmm import tinyguest; "
              "print(tinyguest.build('hello', {'EXIT_STATUS': 5}))"], **kw)
    assert p.returncode == 0, p.stderr.decode()
    elf = p.stdout.decode().strip()
    p = _run([venv / "pyvmm", "boot", "--raw", elf], **kw)
    assert p.returncode == 5, p.stderr.decode()
    assert b"Hello from a tiny guest" in p.stdout


@requires_kvm
@pytest.mark.linux
@pytest.mark.timeout(900)
def test_installed_pyvmm_run_exit_status_and_quiet_stderr(venv, tmp_path):
    p = _run([venv / "pyvmm", "run", "--", "sh", "-c", "echo out; echo oops >&2; exit 7"],
             stdin=subprocess.DEVNULL, timeout=800, **_outside(tmp_path))
    assert p.returncode == 7, p.stderr.decode(errors="replace")
    assert p.stdout == b"out\n"
    # Only the command's own stderr: pyvmm's notes need --verbose (or a failure).
    assert p.stderr == b"oops\n", p.stderr.decode(errors="replace")


@requires_kvm
@pytest.mark.linux
@pytest.mark.timeout(900)
def test_installed_pyvmm_boots_the_default_guest(venv, tmp_path):
    cmd = base64.b64encode(b"echo from-the-wheel").decode()
    p = _run([venv / "pyvmm", "boot", "--cmdline", f"pyvmm.cmd={cmd}"],
             stdin=subprocess.DEVNULL, timeout=800, **_outside(tmp_path))
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    assert b"pyvmm: ready" in p.stdout
    assert b"from-the-wheel" in p.stdout
