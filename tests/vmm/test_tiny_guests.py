"""The VMM end to end on bare-metal test guests, under both run loops.

Each guest is built from guests/tiny/*.S at test time; output and exit status are what
the guest produced through the emulated devices.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import requires_kvm
from vmm.config import ExitReason, MachineConfig
from vmm.machine import Machine

pytestmark = [requires_kvm, pytest.mark.parametrize("loop", ["shim", "python"])]


def boot(path, loop, timeout=20.0, mem=64 << 20):
    out = bytearray()
    with Machine(MachineConfig(kernel=path, mem_size=mem, loop=loop, console=out.extend)) as m:
        result = m.run(timeout=timeout)
        return result, bytes(out), m


def test_polled_uart_output_and_debug_exit(tiny, loop):
    result, out, _ = boot(tiny("hello"), loop)
    assert out == b"Hello from a tiny guest\n"
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0)


def test_interrupt_driven_uart_output(tiny, loop):
    result, out, _ = boot(tiny("serial_irq"), loop)
    assert out == b"Interrupt-driven hello\n"
    assert result.status == 0


def test_port_mmio_and_string_io(tiny, loop):
    result, out, m = boot(tiny("devices"), loop)
    # A non-zero status names the failed check in guests/tiny/devices.S.
    assert result.status == 0, f"check {result.status} failed"
    assert out == b"string io ok\ndevices ok\n"
    assert m.testdev.writes[:2] == [(0x10, 8, 0x1122334455667788), (0x20, 1, 0xAB)]


def test_hlt_woken_by_pit_interrupts(tiny, loop):
    result, out, _ = boot(tiny("timer_hlt"), loop)
    assert out == b"3 ticks\n"
    assert result.status == 0


def test_triple_fault_ends_vm(tiny, loop):
    result, out, _ = boot(tiny("triple_fault"), loop)
    assert out == b"about to triple fault\n"
    assert result.reason is ExitReason.TRIPLE_FAULT
    assert result.status == 4


def test_debug_exit_status_is_the_guest_byte(tiny, loop):
    result, out, _ = boot(tiny("hello", {"EXIT_STATUS": 42}), loop)
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 42)
    assert out == b"Hello from a tiny guest\n"
    result, out, _ = boot(tiny("bench_exits", {"COUNT": 5}), loop)
    assert (out, result.status) == (b".....", 0)


def test_stop_from_another_thread_ends_a_halted_guest_promptly(tiny, loop):
    out = bytearray()
    with Machine(MachineConfig(kernel=tiny("halt_forever"), mem_size=64 << 20, loop=loop,
                               console=out.extend)) as m:
        timer = threading.Timer(0.3, m.stop)
        timer.start()
        t0 = time.monotonic()
        result = m.run(timeout=30)
        elapsed = time.monotonic() - t0
        assert not any(l.thread.is_alive() for l in m.loops)
    assert result.reason is ExitReason.STOPPED
    assert out == b"halting\n"
    assert elapsed < 5


def test_timeout_stops_the_vm(tiny, loop):
    result, _, _ = boot(tiny("halt_forever"), loop, timeout=0.5)
    assert result.reason is ExitReason.STOPPED
    assert "timed out" in result.detail
