"""CPU state a guest process can rely on, checked from inside the guest (one boot)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.run.conftest import BOOT_TIMEOUT_S, pyvmm_run

pytestmark = [pytest.mark.linux, pytest.mark.timeout(BOOT_TIMEOUT_S + 180)]

PROBE_SOURCE = Path(__file__).resolve().parents[2] / "guests" / "probes" / "avxstate.c"


def test_avx_state_of_guest_processes(guest_ready, tmp_path):
    """guests/probes/avxstate.c, built static against glibc, run in the guest.

    Hardware-backed KVM: the guest kernel switches AVX state (XSAVE), so two processes
    ping-ponging over a pipe each keep their own YMM registers (or the OS reports AVX
    off). Emulation-only hosts: the kernel runs with noxsave there and does not switch
    AVX state, yet the host lets user code use AVX (README, "Known problems"), so the
    guest's /init must keep glibc off AVX: glibc reports AVX inactive. (Before that,
    about half of busybox pipelines crashed; tests/linux/test_boot.py::test_pipelines.)
    """
    from vmm import hostcheck

    probe = tmp_path / "probe"
    probe.mkdir()
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(probe / "avxstate"),
                    str(PROBE_SOURCE)], check=True)
    r = pyvmm_run("--copy-in", f"{probe}:/probe", "--", "/probe/avxstate", "2000")
    glibc = re.search(rb"^avxstate: glibc-avx=(active|inactive)$", r.stdout, re.M)
    state = re.search(rb"^avxstate: (disabled|preserved|LEAKED) ", r.stdout, re.M)
    assert glibc and state, r.describe()
    if hostcheck.probe().emulated:
        assert glibc.group(1) == b"inactive", r.describe()
        print(f"explicit AVX use across processes on this host: {state.group(1).decode()}")
    else:
        assert r.returncode == 0, r.describe()
        assert state.group(1) in (b"disabled", b"preserved"), r.describe()
