"""Helpers for the disposable-guest tests (``pyvmm run``, vmm.Guest, the pytest plugin).

The tests that boot Linux are marked ``linux`` (about a minute per boot on our
emulation-only CI hosts; fewer than ten boots in this directory in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: several Linux boots in one test (minutes here)")


#: --boot-timeout given to pyvmm run, and the margin before the subprocess is killed.
BOOT_TIMEOUT_S = 600


def pyvmm_run_argv() -> list[str]:
    return [sys.executable, "-m", "vmm.cli", "run"]


@dataclass
class RunOutput:
    returncode: int
    stdout: bytes
    stderr: bytes

    def describe(self) -> str:
        return (f"exit status {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]!r}\n"
                f"--- stderr ---\n{self.stderr[-3000:].decode(errors='replace')}")


def pyvmm_run(*args: str, timeout: float = BOOT_TIMEOUT_S + 120) -> RunOutput:
    """Run ``pyvmm run ARGS...`` (stdin closed) and capture both streams as bytes."""
    argv = [*pyvmm_run_argv(), "--boot-timeout", str(BOOT_TIMEOUT_S), *args]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return RunOutput(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def guest_ready(default_guest):
    """Skip unless KVM works and the default guest is built (tests/linux/conftest.py)."""
    return default_guest


# The default_guest fixture lives in tests/linux/conftest.py; reuse it here.
from tests.linux.conftest import default_guest, guest_build_prerequisites  # noqa: E402,F401


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def child_pids() -> set[int]:
    kids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids |= {int(x) for x in f.read().split()}
        except OSError:
            pass
    return kids
