"""The Linux "zero page" (struct boot_params) and the e820 memory map.

Offsets are those of ``struct boot_params`` in arch/x86/include/uapi/asm/bootparam.h;
what a boot loader fills in follows Documentation/x86/boot.rst ("THE ACTUAL BOOT",
"64-bit BOOT PROTOCOL"). The VMM writes the zero page at layout.ZERO_PAGE_START and
points RSI at it; the command line goes to layout.CMDLINE_START.
"""

from __future__ import annotations

import struct

from vmm.arch.x86_64 import layout
from vmm.loader import LoaderError
from vmm.loader import bzimage as hdr_fields

#: sizeof(struct boot_params).
ZERO_PAGE_SIZE = 0x1000

# --- struct boot_params offsets ------------------------------------------------------
EXT_RAMDISK_IMAGE_OFFSET = 0x0C0   # u32, high 32 bits of ramdisk_image
EXT_RAMDISK_SIZE_OFFSET = 0x0C4    # u32, high 32 bits of ramdisk_size
EXT_CMD_LINE_PTR_OFFSET = 0x0C8    # u32, high 32 bits of cmd_line_ptr
E820_ENTRIES_OFFSET = 0x1E8        # u8
SENTINEL_OFFSET = 0x1EF            # u8, must stay 0 (else Linux wipes "stale" fields)
SETUP_HEADER_OFFSET = 0x1F1        # struct setup_header
E820_TABLE_OFFSET = 0x2D0          # struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE]
E820_MAX_ENTRIES = 128             # E820_MAX_ENTRIES_ZEROPAGE
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed

# --- e820 types (arch/x86/include/asm/e820/types.h) -----------------------------------
E820_RAM = 1
E820_RESERVED = 2

# --- values pyvmm writes ------------------------------------------------------------
#: type_of_loader 0xFF: "boot loader ID not listed" (boot.rst, type_of_loader).
LOADER_TYPE_UNDEFINED = 0xFF
#: heap_end_ptr: end of the setup heap, relative to the real-mode code, minus 0x200.
#: Only the 16-bit setup code uses it; boot.rst's example value.
HEAP_END_PTR = 0xFE00
#: Boot protocol version claimed for a plain ELF kernel (which has no header).
PLAIN_ELF_VERSION = 0x020F
#: kernel_alignment for a plain ELF (what Firecracker writes; x86-64 CONFIG_PHYSICAL_ALIGN).
PLAIN_ELF_KERNEL_ALIGNMENT = 0x0100_0000
#: COMMAND_LINE_SIZE on x86 when the header does not say (no header at all).
DEFAULT_CMDLINE_SIZE = 2048


def max_cmdline_len(setup_header: bytes | None) -> int:
    """Longest command line (without its NUL) the kernel accepts, capped by our area.

    boot.rst: cmdline_size (0x238, 2.06+) is the maximum size without the terminating
    zero; before 2.06 it was 255. A plain ELF gets x86's COMMAND_LINE_SIZE - 1.
    """
    if setup_header is None:
        limit = DEFAULT_CMDLINE_SIZE - 1
    else:
        version = _hdr_u(setup_header, hdr_fields.VERSION_OFFSET, 2)
        limit = (_hdr_u(setup_header, hdr_fields.CMDLINE_SIZE_OFFSET, 4)
                 if version >= 0x0206 else hdr_fields.OLD_CMDLINE_SIZE)
    return min(limit, layout.CMDLINE_MAX_SIZE - 1)


def _hdr_u(header: bytes, file_offset: int, size: int) -> int:
    off = file_offset - SETUP_HEADER_OFFSET
    return int.from_bytes(header[off:off + size], "little")


def e820_map(mem) -> list[tuple[int, int, int]]:
    """The guest's e820 map: (address, size, type) entries, sorted.

    Low RAM up to the EBDA; the EBDA (where the MP table lives) reserved up to the
    legacy VGA/BIOS hole at 640 KiB; the hole itself (0xA0000-0xFFFFF) absent; then
    RAM from 1 MiB to the end of region 0 and, when the guest has more RAM than fits
    below the MMIO gap, region 1 at 4 GiB.
    """
    entries = [(0, layout.EBDA_START, E820_RAM),
               (layout.EBDA_START, layout.LOW_RAM_END - layout.EBDA_START, E820_RESERVED)]
    for r in mem.regions:
        start = max(r.guest_addr, layout.HIMEM_START)
        if r.end > start:
            entries.append((start, r.end - start, E820_RAM))
    return entries


def build_zero_page(mem, *, setup_header: bytes | None, cmdline: bytes | str,
                    initrd: tuple[int, int] | None,
                    e820: list[tuple[int, int, int]]) -> None:
    """Write struct boot_params at ZERO_PAGE_START and the command line at CMDLINE_START.

    Args:
        mem: the guest's GuestMemory.
        setup_header: LoadedKernel.setup_header (bytes from 0x1f1), or None for a plain
            ELF, in which case a minimal header ("HdrS", boot_flag, version 2.15) is made.
        cmdline: the kernel command line, without NUL (str is encoded as ASCII).
        initrd: (address, size) from load_initrd, or None.
        e820: the memory map, e.g. from :func:`e820_map`.
    Raises:
        LoaderError: command line too long or containing NUL, bad header, too many e820
            entries.
    """
    if isinstance(cmdline, str):
        try:
            cmdline = cmdline.encode("ascii")
        except UnicodeEncodeError:
            raise LoaderError("kernel command line must be ASCII") from None
    if b"\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL byte")
    limit = max_cmdline_len(setup_header)
    if len(cmdline) > limit:
        raise LoaderError(f"kernel command line is {len(cmdline)} bytes, "
                          f"the kernel accepts at most {limit}")
    if len(e820) > E820_MAX_ENTRIES:
        raise LoaderError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")

    zp = bytearray(ZERO_PAGE_SIZE)
    if setup_header is not None:
        room = hdr_fields.MAX_HEADER_END - SETUP_HEADER_OFFSET
        end = hdr_fields.HEADER_MAGIC_OFFSET + 4 - SETUP_HEADER_OFFSET
        if len(setup_header) < end or len(setup_header) > room:
            raise LoaderError(f"setup header is {len(setup_header)} bytes, "
                              f"expected {end} to {room}")
        zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(setup_header)] = setup_header
    else:
        struct.pack_into("<H", zp, hdr_fields.BOOT_FLAG_OFFSET, hdr_fields.BOOT_FLAG)
        zp[hdr_fields.HEADER_MAGIC_OFFSET:hdr_fields.HEADER_MAGIC_OFFSET + 4] = \
            hdr_fields.HEADER_MAGIC
        struct.pack_into("<H", zp, hdr_fields.VERSION_OFFSET, PLAIN_ELF_VERSION)
        struct.pack_into("<I", zp, hdr_fields.KERNEL_ALIGNMENT_OFFSET,
                         PLAIN_ELF_KERNEL_ALIGNMENT)
        struct.pack_into("<I", zp, hdr_fields.CMDLINE_SIZE_OFFSET, DEFAULT_CMDLINE_SIZE - 1)
        zp[hdr_fields.LOADFLAGS_OFFSET] = hdr_fields.LOADED_HIGH

    # Fields a boot loader must fill (boot.rst, "THE ACTUAL BOOT").
    zp[SENTINEL_OFFSET] = 0
    zp[hdr_fields.TYPE_OF_LOADER_OFFSET] = LOADER_TYPE_UNDEFINED
    zp[hdr_fields.LOADFLAGS_OFFSET] |= hdr_fields.CAN_USE_HEAP
    struct.pack_into("<H", zp, hdr_fields.HEAP_END_PTR_OFFSET, HEAP_END_PTR)
    _pack_split(zp, hdr_fields.CMD_LINE_PTR_OFFSET, EXT_CMD_LINE_PTR_OFFSET,
                layout.CMDLINE_START)
    addr, size = initrd if initrd is not None else (0, 0)
    _pack_split(zp, hdr_fields.RAMDISK_IMAGE_OFFSET, EXT_RAMDISK_IMAGE_OFFSET, addr)
    _pack_split(zp, hdr_fields.RAMDISK_SIZE_OFFSET, EXT_RAMDISK_SIZE_OFFSET, size)

    zp[E820_ENTRIES_OFFSET] = len(e820)
    for i, (start, length, kind) in enumerate(e820):
        E820_ENTRY.pack_into(zp, E820_TABLE_OFFSET + i * E820_ENTRY.size, start, length, kind)

    mem.write(layout.ZERO_PAGE_START, zp)
    mem.write(layout.CMDLINE_START, cmdline + b"\0")


def _pack_split(buf: bytearray, low_off: int, high_off: int, value: int) -> None:
    """A 64-bit value as a u32 header field plus its boot_params ``ext_`` high half."""
    struct.pack_into("<I", buf, low_off, value & 0xFFFFFFFF)
    struct.pack_into("<I", buf, high_off, value >> 32)
