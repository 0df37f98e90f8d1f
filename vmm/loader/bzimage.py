"""Parse a bzImage's setup header and load its protected-mode part.

Field offsets are those of ``struct setup_header`` in
arch/x86/include/uapi/asm/bootparam.h, as documented in Documentation/x86/boot.rst
("THE REAL-MODE KERNEL HEADER"); offsets below are from the start of the file, which
is also their offset inside ``struct boot_params`` (the header lives at 0x1f1 in both).

File layout (boot.rst, "THE ACTUAL BOOT"): ``(setup_sects + 1) * 512`` bytes of
real-mode setup code (boot sector included), then the protected-mode kernel, whose
64-bit entry point is 0x200 bytes into it (boot.rst, "64-bit BOOT PROTOCOL").
"""

from __future__ import annotations

import struct
from collections import namedtuple

from vmm.arch.x86_64 import layout
from vmm.loader.errors import LoaderError
from vmm.memory import GuestMemory

# --- Offsets of setup-header fields (boot.rst) -------------------------------------
SETUP_HEADER_START = 0x1F1
SETUP_SECTS_OFFSET = 0x1F1        # u8, sectors of setup code after the boot sector
SYSSIZE_OFFSET = 0x1F4            # u32, protected-mode size in 16-byte units
BOOT_FLAG_OFFSET = 0x1FE          # u16, 0xAA55
JUMP_OFFSET = 0x200               # u16, "jmp short" over the header: 0xEB, displacement
HEADER_MAGIC_OFFSET = 0x202       # "HdrS"
VERSION_OFFSET = 0x206            # u16, boot protocol version (2.12 = 0x020C)
TYPE_OF_LOADER_OFFSET = 0x210     # u8
LOADFLAGS_OFFSET = 0x211          # u8
CODE32_START_OFFSET = 0x214       # u32
RAMDISK_IMAGE_OFFSET = 0x218      # u32
RAMDISK_SIZE_OFFSET = 0x21C       # u32
HEAP_END_PTR_OFFSET = 0x224       # u16
CMD_LINE_PTR_OFFSET = 0x228       # u32
INITRD_ADDR_MAX_OFFSET = 0x22C    # u32 (2.03+)
KERNEL_ALIGNMENT_OFFSET = 0x230   # u32 (2.05+)
RELOCATABLE_KERNEL_OFFSET = 0x234  # u8 (2.05+)
XLOADFLAGS_OFFSET = 0x236         # u16 (2.12+)
CMDLINE_SIZE_OFFSET = 0x238       # u32 (2.06+)
PAYLOAD_OFFSET_OFFSET = 0x248     # u32 (2.08+), from the start of the protected-mode code
PAYLOAD_LENGTH_OFFSET = 0x24C     # u32 (2.08+)
PREF_ADDRESS_OFFSET = 0x258       # u64 (2.10+)
INIT_SIZE_OFFSET = 0x260          # u32 (2.10+)
#: End of the fields this module reads (init_size is the last, ends at 0x264).
MIN_HEADER_END = 0x264
#: ``struct boot_params`` has room for the header up to ``_pad7``'s end (0x290).
MAX_HEADER_END = 0x290

BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
#: 2.12 added xloadflags/XLF_KERNEL_64, i.e. the documented 64-bit entry point.
MIN_VERSION = 0x020C
LOADED_HIGH = 0x01                # loadflags bit 0: protected-mode code at 0x100000
CAN_USE_HEAP = 0x80               # loadflags bit 7: heap_end_ptr is valid
XLF_KERNEL_64 = 0x01              # xloadflags bit 0: has the 64-bit entry at +0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
#: Offset of the 64-bit entry point inside the protected-mode kernel.
ENTRY_64_OFFSET = 0x200
#: initrd_addr_max to assume when the header predates it (boot.rst, 2.03).
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
#: Command-line limit when the header predates cmdline_size (boot.rst, 2.06).
OLD_CMDLINE_SIZE = 255


#: The setup-header fields pyvmm uses, in order, with what each holds.
_SETUP_HEADER_FIELDS = (
    "raw",               # file bytes 0x1f1 .. end of header (0x202 + jump byte)
    "setup_sects",       # 0 in the file means 4 (boot.rst)
    "version",
    "loadflags",
    "xloadflags",
    "code32_start",
    "initrd_addr_max",
    "kernel_alignment",
    "relocatable",       # bool
    "cmdline_size",
    "payload_offset",
    "payload_length",
    "pref_address",
    "init_size",
    "syssize",           # protected-mode size in 16-byte units (0: unknown, < 2.04)
)


class SetupHeader(namedtuple("SetupHeader", _SETUP_HEADER_FIELDS, defaults=(0,))):
    """The setup-header fields pyvmm uses, plus the raw header bytes from 0x1f1.

    (A namedtuple rather than a dataclass: importing dataclasses costs start-up time.)
    """

    __slots__ = ()

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode kernel in the file."""
        return (self.setup_sects + 1) * 512

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def has_header_magic(head: bytes) -> bool:
    return head[HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + 4] == HEADER_MAGIC


def parse_setup_header(head: bytes, file_size: int) -> SetupHeader:
    """Check and decode the setup header at the start of a bzImage.

    Args:
        head: the first bytes of the file (at least the first 4 KiB if the file has them).
        file_size: the whole file's size.
    Raises:
        LoaderError: no "HdrS" magic, bad boot flag, protocol older than 2.12, not a
            bzImage (LOADED_HIGH clear), no 64-bit entry (XLF_KERNEL_64 clear), or the
            file is shorter than its header says.
    """
    if len(head) < HEADER_MAGIC_OFFSET + 4 or not has_header_magic(head):
        raise LoaderError("not a Linux kernel (no HdrS signature at 0x202)")
    if len(head) < MIN_HEADER_END:
        raise LoaderError(f"truncated setup header ({len(head)} bytes, needs {MIN_HEADER_END:#x})")

    def u8(off: int) -> int:
        return head[off]

    def u16(off: int) -> int:
        return struct.unpack_from("<H", head, off)[0]

    def u32(off: int) -> int:
        return struct.unpack_from("<I", head, off)[0]

    if u16(BOOT_FLAG_OFFSET) != BOOT_FLAG:
        raise LoaderError(f"bad boot_flag {u16(BOOT_FLAG_OFFSET):#06x} at 0x1fe (expected 0xaa55)")
    version = u16(VERSION_OFFSET)
    if version < MIN_VERSION:
        raise LoaderError(f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
                          "(pyvmm needs 2.12 or later for the 64-bit entry point)")
    loadflags = u8(LOADFLAGS_OFFSET)
    if not loadflags & LOADED_HIGH:
        raise LoaderError("not a bzImage (loadflags LOADED_HIGH is clear: a zImage)")
    xloadflags = u16(XLOADFLAGS_OFFSET)
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError("kernel is not 64-bit capable (xloadflags lacks XLF_KERNEL_64)")
    # The header ends where the jump at 0x200 lands: 0x202 + its displacement byte.
    end = min(HEADER_MAGIC_OFFSET + u8(JUMP_OFFSET + 1), MAX_HEADER_END)
    end = max(end, MIN_HEADER_END)
    if end > len(head):
        raise LoaderError(f"truncated setup header (ends at {end:#x}, file has {len(head):#x})")
    setup_sects = u8(SETUP_SECTS_OFFSET) or 4
    hdr = SetupHeader(
        raw=bytes(head[SETUP_HEADER_START:end]),
        setup_sects=setup_sects,
        version=version,
        loadflags=loadflags,
        xloadflags=xloadflags,
        code32_start=u32(CODE32_START_OFFSET),
        initrd_addr_max=u32(INITRD_ADDR_MAX_OFFSET),
        kernel_alignment=u32(KERNEL_ALIGNMENT_OFFSET),
        relocatable=bool(u8(RELOCATABLE_KERNEL_OFFSET)),
        cmdline_size=u32(CMDLINE_SIZE_OFFSET),
        payload_offset=u32(PAYLOAD_OFFSET_OFFSET),
        payload_length=u32(PAYLOAD_LENGTH_OFFSET),
        pref_address=struct.unpack_from("<Q", head, PREF_ADDRESS_OFFSET)[0],
        init_size=u32(INIT_SIZE_OFFSET),
        syssize=u32(SYSSIZE_OFFSET) if version >= 0x0204 else 0,
    )
    pm_size = file_size - hdr.setup_size
    if pm_size < ENTRY_64_OFFSET + 16:
        raise LoaderError(f"truncated bzImage: {file_size} bytes, but the setup code alone "
                          f"is {hdr.setup_size} (setup_sects {setup_sects})")
    if hdr.payload_length == 0:
        raise LoaderError("bzImage has no payload (payload_length is 0)")
    if hdr.payload_offset + hdr.payload_length > pm_size:
        raise LoaderError(f"truncated bzImage: the payload ends at "
                          f"{hdr.setup_size + hdr.payload_offset + hdr.payload_length:#x}, "
                          f"file is {file_size:#x} bytes")
    return hdr


def protected_mode_load_address(hdr: SetupHeader) -> int:
    """Where the protected-mode kernel goes for the in-guest decompressor.

    A relocatable kernel (2.05+) goes at pref_address (2.10+), already a multiple of
    kernel_alignment; a non-relocatable one at 0x100000, where LOADED_HIGH says it runs
    from (it moves itself to its link address while decompressing).
    """
    if hdr.relocatable and hdr.pref_address:
        align = hdr.kernel_alignment or 1
        if align & (align - 1) == 0:     # power of two, as boot.rst requires
            return (hdr.pref_address + align - 1) & ~(align - 1)
        return hdr.pref_address
    return layout.HIMEM_START


def load_protected_mode(mem: GuestMemory, f, hdr: SetupHeader, file_size: int) -> tuple[int, int]:
    """Copy the protected-mode kernel into guest RAM for the in-guest decompressor.

    Returns:
        (load address, load end): the end covers init_size, the memory the kernel
        needs from its runtime start address to decompress and run (boot.rst, 2.10).
    Raises:
        LoaderError: it does not fit in RAM.
    """
    addr = protected_mode_load_address(hdr)
    pm_size = file_size - hdr.setup_size
    # syssize (0x1f4, boot protocol 2.04+): the protected-mode code's size in 16-byte
    # paragraphs. A shorter file would have the guest run a truncated decompressor.
    if hdr.syssize and pm_size < hdr.syssize * 16:
        raise LoaderError(f"bzImage is truncated: its protected-mode part is {pm_size} bytes, "
                          f"the header says {hdr.syssize * 16} (syssize)")
    # init_size counts from the kernel's *runtime* start: the load address for a
    # relocatable kernel, pref_address (its link address) for one that moves itself.
    runtime = addr if hdr.relocatable or not hdr.pref_address else hdr.pref_address
    end = max(addr + pm_size, runtime + hdr.init_size)
    # Below 1 MiB are the zero page, the boot page tables, GDT and command line that
    # pyvmm writes after loading the kernel (vmm/arch/x86_64/layout.py), and the EBDA
    # and legacy hole; a pref_address (boot.rst, 2.10) or its init_size reaching there
    # would have them overwrite the kernel. The ELF path refuses such segments too.
    low = min(addr, runtime)
    if low < layout.HIMEM_START:
        raise LoaderError(f"kernel would be loaded at {low:#x} (pref_address "
                          f"{hdr.pref_address:#x}), below {layout.HIMEM_START:#x}, where pyvmm "
                          "puts the zero page and boot page tables")
    if not mem.contains(addr, end - addr):   # one region from the load address to the end
        if end > max(r.end for r in mem.regions):
            raise LoaderError(f"kernel needs {-(-end // layout.MiB)} MiB of RAM, "
                              f"guest has {mem.size >> 20} MiB")
        raise LoaderError(f"kernel at {addr:#x}-{end:#x} does not fit in guest RAM")
    f.seek(hdr.setup_size)
    dst = mem.view(addr, pm_size)
    got = 0
    while got < pm_size:
        n = f.readinto(dst[got:])
        if not n:
            raise LoaderError("bzImage is shorter than expected while loading")
        got += n
    return addr, end
