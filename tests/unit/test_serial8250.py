"""Tests for vmm.devices.serial8250, without a VM."""

import threading
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from vmm.devices import serial8250 as s
from vmm.devices.serial8250 import Serial8250

DATA, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class Harness:
    def __init__(self, fifo_size=64):
        self.irqs = 0
        self.out = bytearray()
        self.changes = 0
        self.uart = Serial8250(self._irq, self.out.extend, fifo_size=fifo_size)
        self.uart.on_state_change = self._changed

    def _irq(self):
        self.irqs += 1

    def _changed(self):
        self.changes += 1

    def r(self, off):
        return self.uart.read(off, 1)

    def w(self, off, val):
        self.uart.write(off, 1, val)


@pytest.fixture
def h():
    return Harness()


def test_reset_values(h):
    assert h.r(IER) == s.DEFAULT_INTERRUPT_ENABLE == 0
    assert h.r(IIR) == s.DEFAULT_INTERRUPT_IDENTIFICATION == 0x01
    assert h.r(LCR) == s.DEFAULT_LINE_CONTROL == 0x03
    assert h.r(MCR) == s.DEFAULT_MODEM_CONTROL == 0x08
    assert h.r(LSR) == 0x60
    assert h.r(MSR) == 0xB0  # DCD | DSR | CTS: Linux wants carrier
    assert h.r(SCR) == 0
    assert h.r(DATA) == 0  # empty receiver
    assert h.uart.fast_path_state() == (True, 0x60)


def test_lsr_idle_after_output(h):
    for b in b"hello":
        h.w(DATA, b)
        assert h.r(LSR) == 0x60
    assert bytes(h.out) == b"hello"


def test_divisor_latch_round_trip(h):
    h.w(LCR, 0x80 | 0x03)
    assert h.r(DATA) == s.DEFAULT_BAUD_DIVISOR and h.r(IER) == 0
    h.w(DATA, 0x01)  # DLL: 115200 baud
    h.w(IER, 0x02)  # DLM
    assert (h.r(DATA), h.r(IER)) == (0x01, 0x02)
    h.w(LCR, 0x03)
    # With DLAB clear the same offsets are RBR/THR and IER again, untouched.
    assert h.r(IER) == 0
    assert bytes(h.out) == b""
    h.w(LCR, 0x83)
    assert (h.r(DATA), h.r(IER)) == (0x01, 0x02)


def test_scratch(h):
    for v in (0xA5, 0x5A, 0x00, 0xFF):
        h.w(SCR, v)
        assert h.r(SCR) == v


def test_ier_existence_test(h):
    # Linux's autoconfig: IER must read back 0 and 0x0f.
    h.w(IER, 0)
    assert h.r(IER) & 0x0F == 0
    h.w(IER, 0x0F)
    assert h.r(IER) & 0x0F == 0x0F


def test_thr_output_calls_output_per_byte():
    seen = []
    uart = Serial8250(lambda: None, seen.append)
    for b in b"ab":
        uart.write(DATA, 1, b)
    assert seen == [b"a", b"b"]


def test_wide_access_is_ignored(h):
    assert h.uart.read(LSR, 2) == 0xFFFF
    h.uart.write(DATA, 2, 0x4142)
    assert bytes(h.out) == b""
    assert h.uart.read(8, 1) == 0xFF


def test_loopback(h):
    h.w(MCR, 0x10 | 0x0A)  # LOOP | OUT2 | RTS: Linux's loopback test
    assert h.r(MSR) & 0xF0 == 0x90  # DCD (from OUT2) | CTS (from RTS)
    h.w(MCR, 0x10 | 0x05)  # LOOP | OUT1 | DTR
    assert h.r(MSR) & 0xF0 == 0x60  # RI | DSR
    assert h.uart.fast_path_state()[0] is False
    h.w(DATA, ord("x"))
    assert bytes(h.out) == b""  # nothing leaves in loopback
    assert h.r(LSR) & 0x01
    assert h.r(DATA) == ord("x")
    assert h.r(LSR) == 0x60
    # Outside input is disconnected in loopback.
    assert h.uart.input_space() == 0
    assert h.uart.enqueue_input(b"zz") == 0
    h.w(MCR, 0x0B)
    assert h.r(MSR) == 0xB0
    assert h.uart.input_space() == 64


def test_fifo_enable_bits_in_iir(h):
    assert h.r(IIR) & 0xC0 == 0
    h.w(FCR, 0x01)
    assert h.r(IIR) == 0xC1
    h.w(FCR, 0x00)
    assert h.r(IIR) == 0x01


def test_fcr_clear_rx(h):
    h.w(FCR, 0x01)
    h.uart.enqueue_input(b"abc")
    h.w(FCR, 0x01 | 0x02)
    assert h.r(LSR) == 0x60


def test_rx_interrupt_when_rdi_enabled(h):
    assert h.uart.enqueue_input(b"ab") == 2
    assert h.irqs == 0  # not enabled
    assert h.r(IIR) == 0x01
    h.w(IER, s.IER_RDA_BIT)  # enabling with data waiting is an edge
    assert h.irqs == 1
    assert h.r(IIR) == 0x04
    assert h.r(LSR) == 0x61
    assert h.r(DATA) == ord("a")
    assert h.r(IIR) == 0x04
    assert h.r(DATA) == ord("b")
    assert h.r(IIR) == 0x01
    assert h.r(LSR) == 0x60
    h.uart.enqueue_input(b"c")
    assert h.irqs == 2


def test_interrupt_called_on_edges_only(h):
    h.w(IER, s.IER_RDA_BIT)
    h.uart.enqueue_input(b"a")
    h.uart.enqueue_input(b"b")
    h.uart.enqueue_input(b"c")
    assert h.irqs == 1  # still the same pending condition
    h.w(IER, s.IER_RDA_BIT)  # rewriting IER changes nothing
    h.w(SCR, 1)
    h.r(IIR)
    assert h.irqs == 1
    while h.r(LSR) & 1:
        h.r(DATA)
    h.uart.enqueue_input(b"d")
    assert h.irqs == 2


def test_thri_pending_on_enable_and_cleared_by_iir_read(h):
    h.w(IER, s.IER_THRI_BIT)
    assert h.irqs == 1
    assert h.r(IIR) == 0x02
    assert h.r(IIR) == 0x01  # reading IIR cleared it
    h.w(IER, s.IER_THRI_BIT)  # no rising edge: stays clear
    assert h.irqs == 1 and h.r(IIR) == 0x01
    h.w(IER, 0)
    h.w(IER, s.IER_THRI_BIT)  # Linux's THRE test toggles IER
    assert h.irqs == 2 and h.r(IIR) == 0x02


def test_thr_write_with_thri_raises_each_time(h):
    h.w(IER, s.IER_THRI_BIT)
    h.r(IIR)
    for n, b in enumerate(b"xyz", start=2):
        h.w(DATA, b)
        assert h.irqs == n
    # Even without reading IIR in between, each write is a new edge.
    assert h.r(IIR) == 0x02
    assert bytes(h.out) == b"xyz"


def test_disabling_thri_clears_pending(h):
    h.w(IER, s.IER_THRI_BIT)
    h.w(IER, 0)
    assert h.r(IIR) == 0x01


def test_iir_priority_rx_over_thri(h):
    h.w(FCR, 0x01)
    h.w(IER, s.IER_RDA_BIT | s.IER_THRI_BIT)
    h.uart.enqueue_input(b"q")
    assert h.irqs == 2  # THRI on enable, RX on arrival
    assert h.r(IIR) == 0xC4  # RX data outranks THR empty
    assert h.r(IIR) == 0xC4  # and reading IIR does not clear THRI underneath
    h.r(DATA)
    assert h.r(IIR) == 0xC2
    assert h.r(IIR) == 0xC1


def test_fifo_bounded_under_flood(h):
    h.w(IER, s.IER_RDA_BIT | s.IER_RLSI_BIT)
    flood = bytes(range(256)) * 4096  # 1 MiB
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    accepted = h.uart.enqueue_input(flood)
    for _ in range(100):
        assert h.uart.enqueue_input(flood) == 0
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert accepted == 64
    assert h.uart.input_space() == 0
    assert grown < 64 * 1024
    # Overrun: line status interrupt outranks RX data; LSR read clears OE.
    assert h.r(IIR) == 0x06
    assert h.r(LSR) == 0x63
    assert h.r(LSR) == 0x61
    assert h.r(IIR) == 0x04
    got = bytes(h.r(DATA) for _ in range(64))
    assert got == flood[:64]
    assert h.r(LSR) == 0x60
    assert h.uart.input_space() == 64


def test_enqueue_partial_when_nearly_full():
    hh = Harness(fifo_size=4)
    assert hh.uart.enqueue_input(b"abc") == 3
    assert hh.uart.input_space() == 1
    assert hh.uart.enqueue_input(b"de") == 1
    assert hh.r(LSR) == 0x63
    assert bytes(hh.r(DATA) for _ in range(4)) == b"abcd"
    assert hh.uart.enqueue_input(b"") == 0


def test_fifo_size_must_be_positive():
    with pytest.raises(ValueError):
        Serial8250(lambda: None, lambda b: None, fifo_size=0)


def test_fast_path_state_transitions(h):
    u = h.uart
    assert u.fast_path_state() == (True, 0x60)
    assert h.changes == 0
    h.w(LCR, 0x83)
    assert u.fast_path_state() == (False, 0x60) and h.changes == 1
    h.w(DATA, 1)  # DLL write: no fast-state change
    assert h.changes == 1
    h.w(LCR, 0x03)
    assert u.fast_path_state() == (True, 0x60) and h.changes == 2
    h.w(IER, s.IER_THRI_BIT)
    assert u.fast_path_state()[0] is False and h.changes == 3
    h.w(IER, 0)
    assert h.changes == 4
    h.w(MCR, 0x18)
    assert u.fast_path_state()[0] is False and h.changes == 5
    h.w(MCR, 0x08)
    assert h.changes == 6
    u.enqueue_input(b"ab")
    assert u.fast_path_state() == (True, 0x61) and h.changes == 7
    u.enqueue_input(b"c")  # DR already set: nothing changed
    assert h.changes == 7
    h.r(DATA)
    h.r(DATA)
    assert h.changes == 7
    h.r(DATA)  # FIFO now empty: DR clears
    assert u.fast_path_state() == (True, 0x60) and h.changes == 8
    h.w(SCR, 0x42)
    h.w(DATA, ord("x"))
    h.r(LSR)
    assert h.changes == 8


def test_fast_path_lsr_minus_one_while_overrun_pending():
    hh = Harness(fifo_size=2)
    hh.uart.enqueue_input(b"abc")
    assert hh.uart.fast_path_state() == (True, -1)
    n = hh.changes
    assert hh.r(LSR) == 0x63
    assert hh.uart.fast_path_state() == (True, 0x61)
    assert hh.changes == n + 1


def test_fast_path_contract_thr_has_no_side_effect_when_ok(h):
    """When tx_fast_ok, a THR write only outputs: the shim may do it itself."""
    h.w(FCR, 0x01)
    h.w(IER, s.IER_RDA_BIT | s.IER_RLSI_BIT)
    assert h.uart.fast_path_state()[0]
    before = [h.r(o) for o in (IER, LCR, MCR, LSR, MSR, SCR)], h.irqs
    h.w(DATA, ord("k"))
    after = [h.r(o) for o in (IER, LCR, MCR, LSR, MSR, SCR)], h.irqs
    assert before == after and bytes(h.out) == b"k"


def test_callbacks_may_reenter_device():
    """interrupt/output/on_state_change run without the lock held."""
    states = []
    uart = None

    def irq():
        states.append(("irq", uart.read(IIR, 1)))

    def out(b):
        states.append(("out", uart.read(LSR, 1)))

    uart = Serial8250(irq, out)
    uart.on_state_change = lambda: states.append(("state", uart.fast_path_state()))
    uart.write(IER, 1, s.IER_THRI_BIT)
    uart.write(DATA, 1, 0x41)
    uart.enqueue_input(b"z")
    assert ("out", 0x60) in states
    assert ("irq", 0x02) in states
    assert states[0] == ("irq", 0x02)
    assert ("state", (False, 0x61)) in states


def test_concurrent_input_and_reads_do_not_lose_or_duplicate():
    h = Harness(fifo_size=16)
    payload = bytes(range(256)) * 20
    received = bytearray()
    done = threading.Event()

    def producer():
        i = 0
        while i < len(payload):
            if h.uart.input_space():
                i += h.uart.enqueue_input(payload[i:i + 7][: h.uart.input_space()])
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    while not (done.is_set() and not h.r(LSR) & 1):
        if h.r(LSR) & 1:
            received.append(h.r(DATA))
    t.join()
    assert bytes(received) == payload
    assert h.r(LSR) == 0x60


VALID_IIR_IDS = {0x01, 0x02, 0x04, 0x06}

ops = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 9), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 9), st.just(0)),
    st.tuples(st.just("in"), st.integers(0, 200), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 32), st.lists(ops, max_size=80))
def test_property_register_sequences(fifo_size, seq):
    h = Harness(fifo_size=fifo_size)
    for kind, off, val in seq:
        if kind == "w":
            h.uart.write(off, 1, val)
        elif kind == "r":
            v = h.uart.read(off, 1)
            assert 0 <= v <= 0xFF
        else:
            n = h.uart.enqueue_input(b"\x55" * off)
            assert 0 <= n <= off
        assert len(h.uart._rx) <= fifo_size
        assert 0 <= h.uart.input_space() <= fifo_size
        tx_ok, lsr = h.uart.fast_path_state()
        with h.uart._lock:
            real_lsr = h.uart._lsr()
            iir = h.uart._iir()
            dlab, ier, mcr = h.uart._lcr & 0x80, h.uart._ier, h.uart._mcr
        assert real_lsr & 0x60 == 0x60 and real_lsr & ~0x63 == 0
        assert lsr == -1 or lsr == real_lsr
        assert (lsr == -1) == bool(real_lsr & 0x02)
        assert tx_ok == (not dlab and not ier & 0x02 and not mcr & 0x10)
        assert iir & 0x0F in VALID_IIR_IDS and iir & 0x30 == 0
        # DR tracks the FIFO exactly.
        assert bool(real_lsr & 1) == bool(h.uart._rx)
