"""Instructions an emulation-only host's KVM cannot execute: completed or diagnosed."""

from __future__ import annotations

import pytest

from tests.conftest import requires_kvm
from vmm import hostcheck
from vmm.config import ExitReason, MachineConfig
from vmm.cpuprofile import HostQuirks
from vmm.machine import Machine

pytestmark = [requires_kvm, pytest.mark.parametrize("loop", ["shim", "python"])]


def boot(path, loop, quirks):
    out = bytearray()
    with Machine(MachineConfig(kernel=path, mem_size=16 << 20, loop=loop, console=out.extend,
                               quirks=quirks)) as m:
        return m.run(timeout=30), bytes(out), m.quirk_counts


def test_int3_and_fwait_complete_with_the_quirks_on(tiny, loop):
    result, out, counts = boot(tiny("int3"), loop, HostQuirks(complete_int3=True, complete_fwait=True))
    assert (result.status, out) == (0, b"breakpoint handled\n")
    if hostcheck.probe().emulated:
        assert counts == {"int3": 1, "fwait": 1}


def test_without_quirks_an_emulation_only_host_stops_with_a_diagnostic(tiny, loop):
    if not hostcheck.probe().emulated:
        pytest.skip("hardware-assisted KVM executes int3 natively")
    result, out, _ = boot(tiny("int3"), loop, HostQuirks())
    assert result.reason is ExitReason.EMULATION_FAILURE and result.status == 5
    assert "bytes: cc" in result.detail and "RIP 0x1" in result.detail


def test_unemulatable_instruction_is_diagnosed(tiny, loop):
    result, out, _ = boot(tiny("popcnt"), loop, HostQuirks(True, True))
    if not hostcheck.probe().emulated:
        assert (result.status, out) == (0, b"popcnt ran\n")
        return
    assert result.reason is ExitReason.EMULATION_FAILURE
    assert "f3 48 0f b8" in result.detail          # popcnt rbx, rax
    assert out == b""
