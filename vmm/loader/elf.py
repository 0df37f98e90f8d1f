"""Load an x86-64 ELF executable (a Linux vmlinux or a bare-metal test guest).

Only what loading needs is parsed: the ELF header and the program headers (System V
ABI, "Program Header"). Every PT_LOAD segment is copied from the file straight into
guest RAM at its *physical* address ``p_paddr``; bytes between ``p_filesz`` and
``p_memsz`` (.bss) are zeroed. Nothing is written before every segment is checked.

On x86-64 Linux, ``vmlinux.lds.S`` says ``ENTRY(phys_startup_64)``: ``e_entry`` is
already the physical address of ``startup_64``. An ELF whose entry is a virtual
address is handled too, by translating it through the segment that contains it.
"""

from __future__ import annotations

import io
import os
import struct
from collections import namedtuple

from vmm.arch.x86_64 import layout
from vmm.loader.errors import LoaderError
from vmm.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD = 1
PF_X = 1

#: Elf64_Ehdr: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
#: e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
#: Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align.
_PHDR = struct.Struct("<IIQQQQQQ")


class Segment(namedtuple("Segment", "offset vaddr paddr filesz memsz flags")):
    """One PT_LOAD program header (a namedtuple: dataclasses cost start-up time)."""

    __slots__ = ()


class ElfImage(namedtuple("ElfImage", "entry segments")):
    """What the loader needs from an ELF file: ``entry`` (e_entry as written in the file)
    and ``segments`` (a tuple of PT_LOAD :class:`Segment`)."""

    __slots__ = ()

    def physical_entry(self) -> int:
        """``e_entry`` as a guest physical address.

        Raises:
            LoaderError: the entry lies in no PT_LOAD segment.
        """
        for s in self.segments:
            if s.paddr <= self.entry < s.paddr + s.memsz:
                return self.entry
        for s in self.segments:
            if s.vaddr <= self.entry < s.vaddr + s.memsz:
                return self.entry - s.vaddr + s.paddr
        raise LoaderError(f"ELF entry point {self.entry:#x} is outside every loadable segment")

    @property
    def load_end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def parse_elf(f: io.BufferedIOBase, file_size: int) -> ElfImage:
    """Read and check the ELF header and PT_LOAD program headers of ``f``.

    Raises:
        LoaderError: not a little-endian x86-64 ELF64 executable, headers truncated,
            or no loadable segment.
    """
    f.seek(0)
    raw = f.read(_EHDR.size)
    if raw[:4] != ELF_MAGIC:
        raise LoaderError("not an ELF file")
    if len(raw) < _EHDR.size:
        raise LoaderError(f"truncated ELF header ({file_size} bytes)")
    (ident, e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = _EHDR.unpack(raw)
    if ident[4] == ELFCLASS32:
        raise LoaderError("32-bit ELF: pyvmm starts kernels in 64-bit long mode "
                          "(build an x86-64 ELF)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise LoaderError("not a little-endian 64-bit ELF file")
    if e_machine != EM_X86_64:
        raise LoaderError(f"ELF is for machine {e_machine}, not x86-64 (EM_X86_64 = 62)")
    if e_type not in (ET_EXEC, ET_DYN):
        raise LoaderError("ELF is not an executable (e_type is neither ET_EXEC nor ET_DYN)")
    if e_phnum == 0:
        raise LoaderError("ELF has no program headers")
    if e_phentsize != _PHDR.size:
        raise LoaderError(f"ELF program header size is {e_phentsize}, expected {_PHDR.size}")
    if e_phoff + e_phnum * _PHDR.size > file_size:
        raise LoaderError("truncated ELF program headers")
    f.seek(e_phoff)
    table = f.read(e_phnum * _PHDR.size)
    segments = []
    for i in range(e_phnum):
        p_type, p_flags, off, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            table, i * _PHDR.size)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise LoaderError(f"ELF segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if off + filesz > file_size:
            raise LoaderError(f"truncated ELF segment {i} (needs bytes up to {off + filesz:#x}, "
                              f"file has {file_size:#x})")
        segments.append(Segment(off, vaddr, paddr, filesz, memsz, p_flags))
    if not segments:
        raise LoaderError("ELF has no loadable (PT_LOAD) segment")
    return ElfImage(e_entry, tuple(segments))


def check_placement(mem: GuestMemory, image: ElfImage) -> None:
    """Check that every segment lands in guest RAM, above the VMM's boot area.

    Raises:
        LoaderError: a segment is below 1 MiB, in the MMIO gap, or beyond RAM.
    """
    ram_top = max(r.end for r in mem.regions)
    for s in image.segments:
        end = s.paddr + s.memsz
        if s.paddr < layout.HIMEM_START:
            raise LoaderError(
                f"kernel segment at {s.paddr:#x} is below {layout.HIMEM_START:#x}, where the "
                "VMM keeps the zero page and page tables (link it at 1 MiB or above)")
        if not mem.contains(s.paddr, s.memsz):
            if end > ram_top:
                need = -(-end // layout.MiB)
                raise LoaderError(f"kernel needs {need} MiB of RAM, guest has "
                                  f"{mem.size >> 20} MiB")
            raise LoaderError(f"kernel segment {s.paddr:#x}-{end:#x} is outside guest RAM "
                              "(it crosses the MMIO gap)")


def load_segments(mem: GuestMemory, f: io.BufferedIOBase, image: ElfImage) -> None:
    """Copy every PT_LOAD segment from ``f`` into guest RAM and zero its .bss part.

    The file is read with ``readinto`` straight into a view of guest memory.
    """
    for s in image.segments:
        if s.filesz:
            f.seek(s.offset)
            dst = mem.view(s.paddr, s.filesz)
            got = 0
            while got < s.filesz:
                n = f.readinto(dst[got:])
                if not n:
                    raise LoaderError(f"truncated ELF segment at offset {s.offset:#x}")
                got += n
        bss = s.memsz - s.filesz
        pos = s.paddr + s.filesz
        while bss:                       # zero in bounded chunks (bss may be many MiB)
            n = min(bss, 1 << 20)
            mem.view(pos, n)[:] = bytes(n)
            pos += n
            bss -= n


def load_elf(mem: GuestMemory, f: io.BufferedIOBase, file_size: int | None = None) -> ElfImage:
    """Parse, check and load an ELF from a seekable binary file or BytesIO.

    Returns:
        The parsed image (its ``physical_entry()`` and ``load_end`` describe the result).
    Raises:
        LoaderError: any problem, with nothing written to guest RAM.
    """
    if file_size is None:
        file_size = f.seek(0, os.SEEK_END)
    image = parse_elf(f, file_size)
    image.physical_entry()          # checked before anything is written
    check_placement(mem, image)
    load_segments(mem, f, image)
    return image


def load_elf_bytes(mem: GuestMemory, data: bytes) -> ElfImage:
    """:func:`load_elf` for an in-memory ELF (a decompressed bzImage payload)."""
    return load_elf(mem, io.BytesIO(data), len(data))
