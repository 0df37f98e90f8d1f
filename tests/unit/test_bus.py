"""Tests for vmm.bus: range bookkeeping, lookup at the edges, unclaimed accesses."""

import logging

import pytest
from hypothesis import given, strategies as st

from vmm.bus import UNCLAIMED_LOG_LIMIT, Bus, BusError


class Recorder:
    """A device that answers reads with a fixed value and records every access."""

    def __init__(self, value=0x1122334455667788):
        self.value = value
        self.reads = []
        self.writes = []

    def read(self, offset, size):
        self.reads.append((offset, size))
        return self.value

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_insert_rejects_zero_length_and_negative_base():
    bus = Bus("pio")
    with pytest.raises(BusError):
        bus.insert(0x10, 0, Recorder())
    with pytest.raises(BusError):
        bus.insert(0x10, -4, Recorder())
    with pytest.raises(BusError):
        bus.insert(-1, 4, Recorder())
    assert len(bus) == 0


@pytest.mark.parametrize(
    "base,length",
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F9, 2), (0x300, 0x200), (0x3F0, 0x10)],
)
def test_insert_rejects_overlap(base, length):
    bus = Bus("pio")
    bus.insert(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(BusError, match="overlaps com1"):
        bus.insert(base, length, Recorder())
    assert len(bus) == 1


def test_adjacent_ranges_are_fine_and_sorted():
    bus = Bus("pio")
    bus.insert(0x400, 8, Recorder(), "c")
    bus.insert(0x3F0, 8, Recorder(), "a")
    bus.insert(0x3F8, 8, Recorder(), "b")
    assert [r.name for r in bus.ranges()] == ["a", "b", "c"]
    assert [r.end for r in bus.ranges()] == [0x3F8, 0x400, 0x408]


def test_find_at_range_edges():
    bus = Bus("mmio")
    a, b = Recorder(), Recorder()
    bus.insert(0x1000, 0x100, a)
    bus.insert(0x2000, 0x10, b)
    assert bus.find(0x0FFF) is None
    assert bus.find(0x1000) == (0x1000, a)
    assert bus.find(0x10FF) == (0x1000, a)
    assert bus.find(0x1100) is None
    assert bus.find(0x1FFF) is None
    assert bus.find(0x2000) == (0x2000, b)
    assert bus.find(0x200F) == (0x2000, b)
    assert bus.find(0x2010) is None
    # The last-hit cache must not answer for an address outside its range.
    assert bus.find(0x1000) == (0x1000, a)
    assert bus.find(0x2000 + 0x10) is None
    assert bus.find(0x10FF + 1) is None


def test_devices_see_offsets_and_values_are_masked():
    bus = Bus("pio")
    dev = Recorder(value=0xABCD)
    bus.insert(0x3F8, 8, dev)
    assert bus.read(0x3FD, 1) == 0xCD
    assert dev.reads == [(5, 1)]
    bus.write(0x3F8, 1, 0x141)
    assert dev.writes == [(0, 1, 0x41)]


def test_read_into_and_write_from():
    bus = Bus("mmio")
    dev = Recorder(value=0x04030201)
    bus.insert(0xD000_0000, 0x1000, dev)
    buf = bytearray(4)
    bus.read_into(0xD000_0008, buf)
    assert bytes(buf) == b"\x01\x02\x03\x04"
    bus.write_from(0xD000_0010, memoryview(b"\x78\x56\x34\x12"))
    assert dev.writes == [(0x10, 4, 0x12345678)]


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, (1 << 64) - 1)])
def test_unclaimed_read_is_all_ones(size, ones):
    bus = Bus("pio")
    assert bus.read(0x80, size) == ones


def test_access_crossing_end_of_range_is_unclaimed():
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(0x1000, 4, dev)
    assert bus.read(0x1002, 4) == 0xFFFF_FFFF
    bus.write(0x1003, 2, 0x1234)
    assert dev.reads == [] and dev.writes == []
    assert bus.read(0x1000, 4) == 0x55667788


def test_unclaimed_logged_once_per_address(caplog):
    bus = Bus("pio")
    with caplog.at_level(logging.DEBUG, logger="vmm.bus"):
        for _ in range(5):
            bus.read(0x80, 1)
            bus.write(0x80, 1, 0)
        bus.write(0x81, 1, 0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "vmm.bus"]
    assert len(msgs) == 2
    assert "0x80" in msgs[0] and "read" in msgs[0]
    assert "0x81" in msgs[1] and "write" in msgs[1]


def test_unclaimed_log_memory_is_bounded(caplog):
    bus = Bus("mmio")
    with caplog.at_level(logging.DEBUG, logger="vmm.bus"):
        for addr in range(UNCLAIMED_LOG_LIMIT + 100):
            assert bus.read(addr, 1) == 0xFF
    assert len(bus._logged) == UNCLAIMED_LOG_LIMIT
    assert sum("no longer logging" in r.getMessage() for r in caplog.records) == 1


@given(st.lists(st.tuples(st.integers(0, 0x400), st.integers(1, 0x40)), max_size=30),
       st.lists(st.integers(0, 0x480), max_size=50))
def test_property_bus_matches_linear_scan(ranges, probes):
    bus = Bus("prop")
    accepted = []
    for base, length in ranges:
        overlaps = any(base < b + l and b < base + length for b, l, _ in accepted)
        dev = Recorder()
        if overlaps:
            with pytest.raises(BusError):
                bus.insert(base, length, dev)
        else:
            bus.insert(base, length, dev)
            accepted.append((base, length, dev))
    for addr in probes:
        expect = next(((b, d) for b, l, d in accepted if b <= addr < b + l), None)
        assert bus.find(addr) == expect
