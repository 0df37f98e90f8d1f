"""Guests in several processes at once: each ``pyvmm run`` is isolated."""

from __future__ import annotations

import subprocess

import pytest

from tests.run.conftest import BOOT_TIMEOUT_S, pyvmm_run_argv

pytestmark = [pytest.mark.linux, pytest.mark.timeout(3 * BOOT_TIMEOUT_S)]


def test_two_pyvmm_run_processes_at_once(guest_ready):
    procs = [subprocess.Popen([*pyvmm_run_argv(), "--boot-timeout", str(2 * BOOT_TIMEOUT_S), "--",
                               "sh", "-c", f"for i in 1 2 3 4 5; do echo proc{n}-$i; done; exit {n}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for n in (3, 4)]
    results = [(p.wait(timeout=3 * BOOT_TIMEOUT_S - 30), p.stdout.read(), p.stderr.read()) for p in procs]
    for n, (status, out, err) in zip((3, 4), results):
        assert status == n, err[-2000:]
        assert out.decode().splitlines() == [f"proc{n}-{i}" for i in range(1, 6)]
