"""The shim's UART fast path against its Python twin: same guest, same bytes."""

from tests.conftest import requires_kvm
from vmm.config import MachineConfig
from vmm.machine import Machine

pytestmark = requires_kvm


def run(path, loop):
    out = bytearray()
    with Machine(MachineConfig(kernel=path, mem_size=16 << 20, loop=loop, console=out.extend)) as m:
        result = m.run(timeout=60)
        return result.status, bytes(out), m.loops[0].fast_exits, m.loops[0].exits


def test_shim_and_python_loops_produce_identical_output(tiny):
    guest = tiny("bench_exits", {"COUNT": 3000})
    s_status, s_out, s_fast, s_exits = run(guest, "shim")
    p_status, p_out, p_fast, p_exits = run(guest, "python")
    assert s_out == p_out == b"." * 3000
    assert s_status == p_status == 0
    # The shim really took the fast path; the Python loop saw every exit.
    assert s_fast == 3000 and s_exits < 10
    assert p_fast == 0 and p_exits >= 3001


def test_fast_path_keeps_order_with_python_handled_writes(tiny):
    # hello polls LSR (fast path) and writes THR; devices mixes string I/O (count > 1,
    # handled in C) with polled prints: the bytes must come out in program order.
    for name, expected in (("hello", b"Hello from a tiny guest\n"),
                           ("devices", b"string io ok\ndevices ok\n"),
                           ("serial_irq", b"Interrupt-driven hello\n")):
        assert run(tiny(name), "shim")[1] == expected
