"""SMP: a bare-metal guest wakes its APs with INIT-SIPI-SIPI through the in-kernel LAPIC.

guests/tiny/smp.S: the BSP (started by the VMM in long mode) sends INIT and two SIPIs to
all other CPUs; each AP goes real -> protected -> long mode through a trampoline at
0x3000, prints "cpu <APIC ID> up" under a UART spinlock and counts itself in; the BSP
prints "all N cpus up" and exits with status 0 (20: the APs did not all arrive).
"""

from __future__ import annotations

import pytest

from tests.conftest import requires_kvm
from vmm.config import ExitReason, MachineConfig
from vmm.machine import Machine

LOOPS = ["shim", "python"]

pytestmark = requires_kvm


def boot(path, loop, cpus, timeout=60.0):
    out = bytearray()
    cfg = MachineConfig(kernel=path, mem_size=64 << 20, cpus=cpus, loop=loop, console=out.extend)
    with Machine(cfg) as m:
        result = m.run(timeout=timeout)
    return result, bytes(out).decode()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("cpus", [2, 4])
def test_aps_come_up_through_init_sipi(tiny, loop, cpus):
    result, out = boot(tiny("smp", {"CPUS": cpus}), loop, cpus)
    lines = out.splitlines()
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), (result, lines)
    # Whole lines only (the guest's UART lock), each CPU exactly once, in any order.
    assert sorted(lines[:-1]) == sorted(f"cpu {k} up" for k in range(cpus)), lines
    assert lines[-1] == f"all {cpus} cpus up"


@pytest.mark.parametrize("loop", LOOPS)
def test_missing_ap_times_out_with_status_20(tiny, loop):
    # Built for 3 CPUs, run on 2: the BSP's bounded wait ends (2^26 TSC cycles).
    result, out = boot(tiny("smp", {"CPUS": 3, "TIMEOUT_TSC": 1 << 26}), loop, 2)
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 20), (result, out)
    assert sorted(out.splitlines()) == ["cpu 0 up", "cpu 1 up"]


@pytest.mark.parametrize("loop", ["shim", "python"])
def test_single_cpu_build_needs_no_aps(tiny, loop):
    result, out = boot(tiny("smp", {"CPUS": 1}), loop, 1)
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0)
    assert out == "cpu 0 up\nall 1 cpus up\n"
