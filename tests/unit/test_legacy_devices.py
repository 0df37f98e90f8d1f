"""Tests for the small legacy devices: i8042, CMOS/RTC, debug exit, test device."""

import math
from datetime import datetime, timezone

import pytest
from hypothesis import given, strategies as st

from vmm.arch.x86_64 import layout
from vmm.bus import Bus
from vmm.devices import cmos as cmos_mod
from vmm.devices import i8042 as kbc
from vmm.devices.cmos import Cmos
from vmm.devices.debugexit import DebugExit
from vmm.devices.i8042 import I8042
from vmm.devices.testdev import TestDevice

# --- i8042 ----------------------------------------------------------------------


class Kbc:
    def __init__(self):
        self.resets = 0
        self.irqs = 0
        self.dev = I8042(self._reset, interrupt=self._irq)
        self.bus = Bus("pio")
        self.bus.insert(layout.I8042_DATA_PORT, kbc.WINDOW_SIZE, self.dev, "i8042")

    def _reset(self):
        self.resets += 1

    def _irq(self):
        self.irqs += 1

    def status(self):
        return self.bus.read(layout.I8042_CMD_PORT, 1)

    def data(self):
        return self.bus.read(layout.I8042_DATA_PORT, 1)

    def cmd(self, c):
        self.bus.write(layout.I8042_CMD_PORT, 1, c)

    def put(self, v):
        self.bus.write(layout.I8042_DATA_PORT, 1, v)

    def command(self, c, *params, nin=1):
        """Like Linux's i8042_command: returns the answer bytes, None on timeout."""
        self.cmd(c)
        for p in params:
            assert not self.status() & kbc.STATUS_IBF_BIT
            self.put(p)
        out = []
        for _ in range(nin):
            if not self.status() & kbc.STATUS_OBF_BIT:
                return None
            out.append(self.data())
        return out


@pytest.fixture
def k():
    return Kbc()


def test_i8042_status_no_data(k):
    st_ = k.status()
    assert st_ & kbc.STATUS_OBF_BIT == 0
    assert st_ & kbc.STATUS_IBF_BIT == 0
    assert k.data() == 0


def test_i8042_other_ports_read_ff(k):
    for port in (0x61, 0x62, 0x63):
        assert k.bus.read(port, 1) == 0xFF


def test_i8042_reset_command(k):
    k.cmd(kbc.CMD_RESET_CPU)
    assert k.resets == 1
    k.cmd(0xFF)  # pulse nothing
    assert k.resets == 1
    k.cmd(0xF0)  # pulse all four lines, reset included
    assert k.resets == 2


def test_i8042_reset_via_output_port(k):
    assert k.command(kbc.CMD_READ_OUTP) == [kbc.DEFAULT_OUTP]
    k.command(kbc.CMD_WRITE_OUTP, 0x03, nin=0)
    assert k.resets == 0
    k.command(kbc.CMD_WRITE_OUTP, 0x02, nin=0)
    assert k.resets == 1


def test_i8042_self_tests(k):
    assert k.command(kbc.CMD_SELF_TEST) == [0x55]
    assert k.command(kbc.CMD_KBD_TEST) == [0x00]
    assert not k.status() & kbc.STATUS_OBF_BIT
    assert k.irqs == 0  # controller answers are polled, not interrupting


def test_i8042_ctr_read_write(k):
    assert k.command(kbc.CMD_READ_CTR) == [kbc.DEFAULT_CTR]
    k.command(kbc.CMD_WRITE_CTR, 0x47, nin=0)
    assert k.command(kbc.CMD_READ_CTR) == [0x47]
    k.cmd(kbc.CMD_KBD_DISABLE)
    k.cmd(kbc.CMD_AUX_DISABLE)
    assert k.command(kbc.CMD_READ_CTR) == [0x47 | 0x30]
    k.cmd(kbc.CMD_KBD_ENABLE)
    k.cmd(kbc.CMD_AUX_ENABLE)
    assert k.command(kbc.CMD_READ_CTR) == [0x47]


def test_i8042_linux_check_aux_gives_up_without_waiting(k):
    # i8042_check_aux: AUX_LOOP must not come back as aux data...
    k.cmd(kbc.CMD_AUX_LOOP)
    k.put(0x5A)
    assert k.status() & kbc.STATUS_OBF_BIT
    assert not k.status() & kbc.STATUS_AUXDATA_BIT
    # ...and the aux test then reports a broken interface (answered, no timeout).
    ans = k.command(kbc.CMD_AUX_TEST)
    assert ans is not None and ans[0] not in (0x00, 0xFA, 0xFF)


def test_i8042_keyboard_acks_with_interrupt(k):
    k.put(0xF4)  # enable scanning
    assert k.status() & kbc.STATUS_OBF_BIT
    assert k.data() == kbc.KBD_ACK
    assert k.irqs == 1
    k.put(0xFF)  # reset: FA AA
    assert k.data() == 0xFA
    assert k.irqs == 3  # one for the answer, one more because AA is still queued
    assert k.data() == 0xAA
    assert not k.status() & kbc.STATUS_OBF_BIT


def test_i8042_no_interrupt_when_kbdint_disabled(k):
    k.command(kbc.CMD_WRITE_CTR, 0x00, nin=0)
    k.put(0xF2)
    assert [k.data() for _ in range(3)] == [0xFA, 0xAB, 0x83]
    assert k.irqs == 0


def test_i8042_wide_access(k):
    assert k.dev.read(0, 2) == 0xFFFF
    k.dev.write(4, 2, 0xFE)
    assert k.resets == 0


def test_i8042_without_interrupt_callable():
    dev = I8042(lambda: None)
    dev.write(0, 1, 0xF2)
    assert dev.read(4, 1) & 1


@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4]), st.booleans(), st.integers(0, 255)),
                max_size=60))
def test_i8042_property_never_raises_and_stays_bounded(seq):
    dev = I8042(lambda: None, lambda: None)
    for off, is_write, val in seq:
        if is_write:
            dev.write(off, 1, val)
        else:
            assert 0 <= dev.read(off, 1) <= 0xFF
        assert len(dev._out) <= kbc.OUTPUT_QUEUE_SIZE
        assert not dev.read(4, 1) & kbc.STATUS_IBF_BIT


# --- CMOS / RTC -----------------------------------------------------------------

# 2024-02-29 13:05:09 UTC, a Thursday.
T = datetime(2024, 2, 29, 13, 5, 9, tzinfo=timezone.utc).timestamp()


def rd(dev, index):
    dev.write(0, 1, index)
    return dev.read(1, 1)


def test_cmos_bcd_time():
    dev = Cmos(clock=lambda: T)
    assert rd(dev, 0x00) == 0x09
    assert rd(dev, 0x02) == 0x05
    assert rd(dev, 0x04) == 0x13
    assert rd(dev, 0x06) == 5  # Thursday: Sunday = 1
    assert rd(dev, 0x07) == 0x29
    assert rd(dev, 0x08) == 0x02
    assert rd(dev, 0x09) == 0x24
    assert rd(dev, 0x32) == 0x20


def test_cmos_weekday_sunday_is_one():
    sunday = datetime(2023, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    dev = Cmos(clock=lambda: sunday)
    assert rd(dev, 0x06) == 1
    assert rd(dev, 0x09) == 0x23


def test_cmos_follows_clock():
    now = [T]
    dev = Cmos(clock=lambda: now[0])
    assert rd(dev, 0x00) == 0x09
    now[0] += 50
    assert rd(dev, 0x00) == 0x59
    now[0] += 1
    assert (rd(dev, 0x00), rd(dev, 0x02)) == (0x00, 0x06)


def test_cmos_status_registers():
    dev = Cmos(clock=lambda: T)
    assert rd(dev, 0x0A) == 0x26
    assert rd(dev, 0x0A) & cmos_mod.REG_A_UIP_BIT == 0
    assert rd(dev, 0x0B) == 0x02
    assert rd(dev, 0x0C) == 0x00
    assert rd(dev, 0x0D) == 0x80
    # UIP cannot be set, C and D are read-only.
    dev.write(0, 1, 0x0A)
    dev.write(1, 1, 0xA6)
    assert rd(dev, 0x0A) == 0x26
    dev.write(0, 1, 0x0D)
    dev.write(1, 1, 0x00)
    assert rd(dev, 0x0D) == 0x80


def test_cmos_binary_and_12h_modes():
    dev = Cmos(clock=lambda: T)
    dev.write(0, 1, 0x0B)
    dev.write(1, 1, cmos_mod.REG_B_DM_BINARY_BIT | cmos_mod.REG_B_24H_BIT)
    assert rd(dev, 0x00) == 9 and rd(dev, 0x04) == 13 and rd(dev, 0x09) == 24
    dev.write(0, 1, 0x0B)
    dev.write(1, 1, 0x00)  # BCD, 12-hour
    assert rd(dev, 0x04) == 0x80 | 0x01  # 1 PM


def test_cmos_nmi_bit_ignored():
    dev = Cmos(clock=lambda: T)
    dev.write(0, 1, 0x80 | 0x04)
    assert dev.read(1, 1) == 0x13
    dev.write(0, 1, 0x80 | 0x40)
    dev.write(1, 1, 0x77)
    assert rd(dev, 0x40) == 0x77


def test_cmos_ram_and_time_writes():
    dev = Cmos(clock=lambda: T)
    for index in (0x0E, 0x10, 0x31, 0x33, 0x7F, 0x01, 0x03, 0x05):
        assert rd(dev, index) == 0
        dev.write(1, 1, index ^ 0x5A)
        assert rd(dev, index) == index ^ 0x5A
    dev.write(0, 1, 0x00)
    dev.write(1, 1, 0x45)  # the host clock is not ours to set
    assert rd(dev, 0x00) == 0x09
    assert dev.read(0, 1) == 0xFF  # index port is write-only
    assert dev.read(1, 2) == 0xFFFF


@given(st.floats(min_value=0, max_value=4102444799, allow_nan=False))
def test_cmos_property_bcd_matches_datetime(ts):
    dev = Cmos(clock=lambda: ts)
    # An RTC shows whole seconds elapsed: the oracle floors (datetime alone would round
    # 1.9999995 up to 2 at its microsecond resolution).
    now = datetime.fromtimestamp(math.floor(ts), tz=timezone.utc)

    def unbcd(v):
        assert v >> 4 <= 9 and v & 0xF <= 9
        return (v >> 4) * 10 + (v & 0xF)

    got = [unbcd(rd(dev, i)) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)]
    assert got == [now.second, now.minute, now.hour, now.day, now.month, now.year % 100,
                   now.year // 100]


# --- Debug exit -----------------------------------------------------------------


def test_debug_exit():
    codes = []
    dev = DebugExit(codes.append)
    bus = Bus("pio")
    bus.insert(layout.DEBUG_EXIT_PORT, 1, dev, "debug-exit")
    bus.write(layout.DEBUG_EXIT_PORT, 1, 0)
    bus.write(layout.DEBUG_EXIT_PORT, 1, 0x2A)
    bus.write(layout.DEBUG_EXIT_PORT, 4, 0x1FF)  # crosses the 1-byte window: dropped
    assert codes == [0, 0x2A]
    dev.write(0, 4, 0x1FF)  # on a wider window the low byte is the status
    assert codes == [0, 0x2A, 0xFF]
    assert bus.read(layout.DEBUG_EXIT_PORT, 1) == 0xFF


# --- Test device ------------------------------------------------------------------


def test_testdev_id_and_write_count():
    dev = TestDevice()
    assert dev.read(0, 4) == 0x4D4D5650
    assert dev.read(0, 4).to_bytes(4, "little") == b"PVMM"
    assert dev.read(4, 4) == 0
    dev.write(0, 4, 0xDEAD)  # read-only: ignored, but counted
    dev.write(0x100, 1, 1)
    assert dev.read(0, 4) == 0x4D4D5650
    assert dev.read(4, 4) == 2
    assert dev.read(0, 8) == 0x4D4D5650 | (2 << 32)
    assert dev.writes == [(0, 4, 0xDEAD), (0x100, 1, 1)]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_testdev_scratch_round_trip(size):
    dev = TestDevice()
    value = 0x0123456789ABCDEF & ((1 << (8 * size)) - 1)
    for off in (0x10, 0x13, 0x4F - size + 1):
        dev.write(off, size, value)
        assert dev.read(off, size) == value


def test_testdev_scratch_little_endian_and_other_offsets():
    dev = TestDevice()
    dev.write(0x10, 4, 0x44332211)
    assert [dev.read(0x10 + i, 1) for i in range(4)] == [0x11, 0x22, 0x33, 0x44]
    assert dev.read(0x12, 2) == 0x4433
    for off in (0x08, 0x0C, 0x50, 0x800, 0xFFC):
        dev.write(off, 4, 0xFFFF_FFFF)
        assert dev.read(off, 4) == 0
    # An access straddling the end of the scratch area keeps only the inside bytes.
    dev.write(0x4E, 4, 0xAABBCCDD)
    assert dev.read(0x4E, 2) == 0xCCDD
    assert dev.read(0x4E, 4) == 0xCCDD


def test_testdev_on_bus():
    dev = TestDevice()
    bus = Bus("mmio")
    bus.insert(layout.TEST_MMIO_START, layout.TEST_MMIO_SIZE, dev, "testdev")
    bus.write(layout.TEST_MMIO_START + 0x18, 8, 0x1122334455667788)
    assert bus.read(layout.TEST_MMIO_START + 0x18, 8) == 0x1122334455667788
    assert bus.read(layout.TEST_MMIO_START, 4) == 0x4D4D5650
    assert bus.read(layout.TEST_MMIO_START + layout.TEST_MMIO_SIZE, 4) == 0xFFFF_FFFF
