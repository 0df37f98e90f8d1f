"""Zero page (struct boot_params) and e820 map tests, no VM."""

from __future__ import annotations

import struct

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparams import (E820_RAM, E820_RESERVED, build_zero_page, e820_map,
                                        max_cmdline_len)
from vmm.loader import LoaderError
from vmm.memory import GuestMemory

MiB, GiB = layout.MiB, layout.GiB
ZP = layout.ZERO_PAGE_START


def header(version=0x020F, cmdline_size=2047, loadflags=0x01, jump=0x6A) -> bytes:
    """Setup-header bytes as a bzImage has them from 0x1f1 (file offset = zero-page offset)."""
    buf = bytearray(0x202 + jump)
    buf[0x1F1] = 4
    struct.pack_into("<H", buf, 0x1FE, 0xAA55)
    buf[0x200:0x202] = bytes([0xEB, jump])
    buf[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", buf, 0x206, version)
    buf[0x211] = loadflags
    struct.pack_into("<I", buf, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", buf, 0x238, cmdline_size)
    struct.pack_into("<I", buf, 0x260, 0x123456)         # init_size: must survive the copy
    return bytes(buf[0x1F1:])


@pytest.fixture
def mem():
    with GuestMemory(64 * MiB) as m:
        m.write(ZP, b"\xff" * 0x1000)                      # stale bytes must be cleared
        yield m


def u(mem, off, size):
    return mem.read_int(ZP + off, size)


def test_layout_leaves_room_for_zero_page_and_cmdline():
    assert ZP + 0x1000 <= layout.CMDLINE_START or layout.CMDLINE_START + \
        layout.CMDLINE_MAX_SIZE <= ZP
    assert layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE <= layout.EBDA_START


def test_plain_elf_zero_page(mem):
    e820 = e820_map(mem)
    build_zero_page(mem, setup_header=None, cmdline=b"console=ttyS0 nopv", initrd=None, e820=e820)
    assert u(mem, 0x1FE, 2) == 0xAA55                      # boot_flag
    assert mem.read(ZP + 0x202, 4) == b"HdrS"              # header
    assert u(mem, 0x206, 2) == 0x020F                      # version
    assert u(mem, 0x210, 1) == 0xFF                        # type_of_loader
    assert u(mem, 0x211, 1) & 0x80                         # loadflags CAN_USE_HEAP
    assert u(mem, 0x224, 2) == 0xFE00                      # heap_end_ptr
    assert u(mem, 0x228, 4) == layout.CMDLINE_START        # cmd_line_ptr
    assert u(mem, 0x0C8, 4) == 0                           # ext_cmd_line_ptr
    assert u(mem, 0x218, 4) == u(mem, 0x21C, 4) == 0       # no ramdisk
    assert u(mem, 0x1EF, 1) == 0                           # sentinel
    assert u(mem, 0x000, 8) == 0                           # stale bytes cleared
    assert mem.read(layout.CMDLINE_START, 19) == b"console=ttyS0 nopv\0"
    assert u(mem, 0x1E8, 1) == len(e820) == 3              # e820_entries
    for i, entry in enumerate(e820):
        assert struct.unpack_from("<QQI", mem.read(ZP + 0x2D0 + 20 * i, 20)) == entry


def test_setup_header_copied_and_loader_fields_set(mem):
    hdr = header()
    build_zero_page(mem, setup_header=hdr, cmdline="quiet", initrd=(0x3F0_0000, 0x1234),
                    e820=e820_map(mem))
    zp = mem.read(ZP, 0x1000)
    assert zp[0x1F1] == 4 and zp[0x202:0x206] == b"HdrS"
    assert u(mem, 0x260, 4) == 0x123456                    # init_size copied
    assert u(mem, 0x211, 1) == 0x81                        # LOADED_HIGH kept, heap added
    assert u(mem, 0x210, 1) == 0xFF
    assert u(mem, 0x218, 4) == 0x3F0_0000 and u(mem, 0x21C, 4) == 0x1234
    assert u(mem, 0x0C0, 4) == 0 and u(mem, 0x0C4, 4) == 0
    assert zp[0x1F1 + len(hdr):0x290] == bytes(0x290 - 0x1F1 - len(hdr))


def test_initrd_above_4g_uses_ext_fields(mem):
    build_zero_page(mem, setup_header=header(), cmdline=b"", initrd=(0x1_2345_6000, 0x1_0000_0001),
                    e820=[])
    assert u(mem, 0x218, 4) == 0x2345_6000 and u(mem, 0x0C0, 4) == 1
    assert u(mem, 0x21C, 4) == 1 and u(mem, 0x0C4, 4) == 1
    assert mem.read(layout.CMDLINE_START, 1) == b"\0"


@pytest.mark.parametrize("hdr, limit", [
    (None, 2047),
    (header(cmdline_size=255), 255),
    (header(version=0x0205, cmdline_size=4000), 255),      # cmdline_size is 2.06+
    (header(cmdline_size=0xFFFFFFFF), layout.CMDLINE_MAX_SIZE - 1),
])
def test_command_line_limit(mem, hdr, limit):
    assert max_cmdline_len(hdr) == limit
    build_zero_page(mem, setup_header=hdr, cmdline=b"a" * limit, initrd=None, e820=[])
    assert mem.read(layout.CMDLINE_START + limit, 1) == b"\0"
    with pytest.raises(LoaderError, match=rf"^kernel command line is {limit + 1} bytes, "
                                          rf"the kernel accepts at most {limit}$"):
        build_zero_page(mem, setup_header=hdr, cmdline=b"a" * (limit + 1), initrd=None, e820=[])


def test_bad_inputs(mem):
    with pytest.raises(LoaderError, match="NUL"):
        build_zero_page(mem, setup_header=None, cmdline=b"a\0b", initrd=None, e820=[])
    with pytest.raises(LoaderError, match="ASCII"):
        build_zero_page(mem, setup_header=None, cmdline="caf\u00e9", initrd=None, e820=[])
    with pytest.raises(LoaderError, match="e820"):
        build_zero_page(mem, setup_header=None, cmdline=b"", initrd=None,
                        e820=[(0, 1, 1)] * 129)
    with pytest.raises(LoaderError, match="setup header"):
        build_zero_page(mem, setup_header=b"\0" * 5, cmdline=b"", initrd=None, e820=[])


def test_e820_64mib(mem):
    assert e820_map(mem) == [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.LOW_RAM_END - layout.EBDA_START, E820_RESERVED),
        (layout.HIMEM_START, 64 * MiB - layout.HIMEM_START, E820_RAM),
    ]


def test_e820_exactly_up_to_the_gap():
    with GuestMemory(3 * GiB) as m:
        assert e820_map(m)[-1] == (layout.HIMEM_START, layout.MMIO_GAP_START -
                                   layout.HIMEM_START, E820_RAM)
        assert len(e820_map(m)) == 3


def test_e820_above_4g_skips_the_mmio_gap():
    with GuestMemory(5 * GiB) as m:
        ram = [(a, s) for a, s, t in e820_map(m) if t == E820_RAM]
        assert ram[-2:] == [(layout.HIMEM_START, layout.MMIO_GAP_START - layout.HIMEM_START),
                            (layout.MMIO_GAP_END, 5 * GiB - layout.MMIO_GAP_START)]
        assert sum(s for _, s in ram) == 5 * GiB - (layout.HIMEM_START - layout.EBDA_START)
        for a, s in ram:                                   # every RAM entry is really RAM
            assert m.contains(a, s)
        assert not m.contains(layout.MMIO_GAP_START)
