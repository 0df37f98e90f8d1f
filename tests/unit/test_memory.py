from __future__ import annotations

import pytest

from vmm.arch.x86_64 import layout
from vmm.memory import GuestMemory, GuestMemoryError, parse_size, ram_regions


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("64", 64 << 20), ("2048K", 2 << 20),
    ("1g", 1 << 30), ("256MiB", 256 << 20), (" 3 G ", 3 << 30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "12X", "1.5G", "G", "abc"])
def test_parse_size_rejects(text):
    with pytest.raises(GuestMemoryError):
        parse_size(text)


def test_small_guest_is_one_region_at_zero():
    assert [(r.guest_addr, r.size) for r in ram_regions(512 << 20)] == [(0, 512 << 20)]


def test_large_guest_skips_the_mmio_gap():
    regions = ram_regions(5 << 30)
    assert [(r.guest_addr, r.size, r.host_offset) for r in regions] == [
        (0, layout.MMIO_GAP_START, 0),
        (1 << 32, (5 << 30) - layout.MMIO_GAP_START, layout.MMIO_GAP_START)]


def test_bounds_checked_access():
    with GuestMemory(4 << 20) as mem:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        mem.write_int(0x2000, 8, 0x1122334455667788)
        assert mem.read(0x2000, 2) == b"\x88\x77"
        for gpa, n in ((mem.size - 1, 2), (mem.size, 1), (-1, 1), (1 << 40, 1)):
            assert not mem.contains(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"x" * n)


def test_access_spanning_the_gap_is_refused():
    with GuestMemory(4 << 30) as mem:          # MAP_NORESERVE: nothing is touched
        mem.write(layout.MMIO_GAP_END, b"hi")
        assert mem.read(layout.MMIO_GAP_END, 2) == b"hi"
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_GAP_START - 1, 2)
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_GAP_START, 1)


def test_size_limits():
    with pytest.raises(GuestMemoryError):
        GuestMemory(0)
    with pytest.raises(GuestMemoryError):
        GuestMemory(10 << 40)


def test_translate_agrees_with_view():
    with GuestMemory(4 << 30) as mem:          # two regions, around the MMIO gap
        assert mem.spans == tuple((r.guest_addr, r.end, r.host_offset) for r in mem.regions)
        high = layout.MMIO_GAP_END
        mem.write(high + 8, b"xyz")
        off = mem.translate(high + 8, 3)
        assert off == layout.MMIO_GAP_START + 8
        assert bytes(mem.host_view[off:off + 3]) == b"xyz"
        assert mem.translate(0x1000, 16) == 0x1000
        for gpa, n in ((layout.MMIO_GAP_START - 1, 2), (layout.MMIO_GAP_START, 1),
                       (high + mem.regions[1].size, 1), (0, -1), ((1 << 64) - 1, 2)):
            assert mem.translate(gpa, n) == -1
            assert not mem.contains(gpa, n)


def test_host_u16_is_the_mapping_as_words():
    mem = GuestMemory(4 << 30)
    off = mem.translate(layout.MMIO_GAP_END + 6, 2)
    mem.host_u16[off >> 1] = 0xBEEF
    assert mem.read(layout.MMIO_GAP_END + 6, 2) == b"\xef\xbe"   # little-endian
    mem.write(0x10, b"\x34\x12")
    assert mem.host_u16[0x10 >> 1] == 0x1234
    mem.close()                                   # the word view does not keep the map
    assert mem.host_buffer is None
