"""Fixtures for the tests that boot the project's default Linux guest.

Every test here is marked ``linux`` (see each module's ``pytestmark``): they cost about
a minute per boot on emulation-only KVM hosts (docs/emulation-only-hosts.md), so run or skip them
as a group with ``-m linux`` / ``-m "not linux"``.

The guest is built once and cached (vmm.guestbuild); the fixtures skip, with the reason,
when the host lacks what the build or a boot needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import kvm_usable

#: How long one Linux boot may take here before the VMM is told to stop (--timeout),
#: and, a little later, the subprocess is killed. A boot takes ~50 s on our CI hosts.
BOOT_TIMEOUT_S = 300


def _build_prerequisites_missing() -> str | None:
    """Why the default guest cannot be built here, or None."""
    from vmm import guestbuild

    if not guestbuild.SOURCE_TARBALL.is_file():
        return (f"{guestbuild.SOURCE_TARBALL} missing (Debian package "
                f"{guestbuild.SOURCE_PACKAGE}; run scripts/setup-host.sh)")
    busybox = Path(os.environ.get("PYVMM_BUSYBOX") or guestbuild.DEFAULT_BUSYBOX)
    if not busybox.is_file():
        return f"{busybox} missing (Debian package busybox-static; run scripts/setup-host.sh)"
    if not guestbuild.is_static_elf(busybox.read_bytes()):
        return f"{busybox} is not a static executable (install busybox-static)"
    return None


@dataclass(frozen=True)
class DefaultGuest:
    """The cached default guest: the ELF kernel pyvmm boots by default, its bzImage
    (gzip payload, same build), and the initramfs."""

    vmlinux: Path
    bzimage: Path
    initramfs: Path


@pytest.fixture(scope="session")
def guest_build_prerequisites():
    """Skip unless the default guest can be built (or is cached) on this host."""
    why = _build_prerequisites_missing()
    if why:
        pytest.skip(f"cannot build the default Linux guest: {why}")


@pytest.fixture(scope="session")
def default_guest(guest_build_prerequisites) -> DefaultGuest:
    """Build (first time: ~5 min) or fetch from the cache the default Linux guest.

    Skips when /dev/kvm is unusable (nothing here could boot it) or the build
    prerequisites are missing.
    """
    why = kvm_usable()
    if why:
        pytest.skip(f"cannot boot Linux guests: {why}")
    from vmm import guestbuild

    vmlinux, initramfs = guestbuild.default_guest()
    kernel = guestbuild.build_kernel("gzip")
    assert kernel.vmlinux == vmlinux, "default_guest() is not the gzip build"
    return DefaultGuest(vmlinux=vmlinux, bzimage=kernel.bzimage, initramfs=initramfs)


def pyvmm_command() -> list[str]:
    """How to start the CLI: the installed ``pyvmm`` script if it is on PATH, else
    ``python -m vmm.cli`` with this interpreter."""
    exe = shutil.which("pyvmm")
    return [exe] if exe else [sys.executable, "-m", "vmm.cli"]


@dataclass
class BootResult:
    returncode: int
    stdout: str
    stderr: str

    def __iter__(self):  # (returncode, stdout, stderr) = run_pyvmm(...)
        return iter((self.returncode, self.stdout, self.stderr))

    def describe(self) -> str:
        """Both streams' tails, for assertion messages."""
        return (f"exit status {self.returncode}\n--- stdout (tail) ---\n"
                f"{self.stdout[-3000:]}\n--- stderr (tail) ---\n{self.stderr[-3000:]}")


def run_pyvmm(*args: str, command: str | None = None, timeout: float = BOOT_TIMEOUT_S,
              env: dict | None = None) -> BootResult:
    """Run ``pyvmm boot ARGS...`` as a subprocess, stdin closed (not a terminal).

    Args:
        args: arguments after ``boot`` (a KERNEL path, options).
        command: a shell command for the default guest's /init, passed as
            ``--cmdline pyvmm.cmd=<base64>`` (vmm.guestbuild.command_param).
        timeout: ``--timeout`` given to pyvmm (unless ``args`` has one already); the
            subprocess itself is killed 60 s later (the test then fails).
        env: extra environment variables.

    Returns:
        A BootResult, which unpacks as ``(returncode, stdout, stderr)``.
    """
    from vmm.guestbuild import command_param

    argv = [*pyvmm_command(), "boot", *args]
    if command is not None:
        argv += ["--cmdline", command_param(command)]
    if "--timeout" not in args:
        argv += ["--timeout", str(timeout)]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout + 60, env={**os.environ, **(env or {})},
                          text=True, errors="replace")
    return BootResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def boot():
    """The :func:`run_pyvmm` helper, as a fixture."""
    return run_pyvmm
