"""Load Linux kernels (ELF vmlinux or bzImage) and initrds into guest memory.

Public API::

    load_kernel(mem, path, *, mode="auto") -> LoadedKernel
    load_initrd(mem, path, *, kernel, initrd_addr_max=None) -> (addr, size)
    SymbolTable.from_elf(path_or_bytes) / SymbolTable.from_system_map(path)
    LoaderError   every problem a user can cause, as a one-line message

A bzImage is preferably decompressed on the host (vmm/loader/decompress.py) and its
vmlinux started at ``startup_64``: on hosts that interpret guest ring-0 code, the
in-guest decompressor would cost minutes (docs/emulation-only-hosts.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from vmm.loader.errors import LoaderError


class LoadedKernel:
    """Where a kernel was put in guest memory and how to start it.

    Attributes:
        entry: guest physical address where the boot vCPU starts, in 64-bit long mode.
        kind: "elf" (a vmlinux or test guest started at its ELF entry, for Linux
            startup_64) or "bzimage" (the in-guest decompressor's 64-bit entry,
            protected-mode load address + 0x200).
        setup_header: bzImage setup-header bytes (file offset 0x1f1 to the header's end)
            to copy into boot_params at 0x1f1; None for a plain ELF.
        load_end: first byte after everything the kernel occupies (including .bss, or
            init_size for the in-guest decompressor); an initrd must start above it.
        codec: the bzImage payload codec ("gzip", "xz", "lzma", "bzip2", "lz4", "zstd",
            "none" for an uncompressed payload), None for a plain ELF or unknown codec.
        source: the kernel file.
        fallback_reason: why a bzImage in mode "auto" is run through the (slow)
            in-guest decompressor instead of being decompressed here; None otherwise.
    """

    # A plain class, not a dataclass: importing dataclasses costs start-up time.
    def __init__(self, entry: int, kind: str, setup_header: bytes | None, load_end: int,
                 codec: str | None = None, source: Path | None = None,
                 fallback_reason: str | None = None):
        self.entry = entry
        self.kind = kind
        self.setup_header = setup_header
        self.load_end = load_end
        self.codec = codec
        self.source = source
        self.fallback_reason = fallback_reason
        self._symbols = None

    def __repr__(self) -> str:
        return (f"LoadedKernel(entry={self.entry:#x}, kind={self.kind!r}, "
                f"load_end={self.load_end:#x}, codec={self.codec!r}, source={self.source!r})")

    @property
    def initrd_addr_max(self) -> int:
        """Highest address the initrd may occupy (setup header 0x22c).

        A plain ELF vmlinux has no header; 0x7fffffff is what every x86-64 kernel's own
        header says (arch/x86/boot/header.S).
        """
        from vmm.loader.bzimage import DEFAULT_INITRD_ADDR_MAX, INITRD_ADDR_MAX_OFFSET, \
            SETUP_HEADER_START
        if self.setup_header is None:
            return 0x7FFFFFFF
        off = INITRD_ADDR_MAX_OFFSET - SETUP_HEADER_START
        value = int.from_bytes(self.setup_header[off:off + 4], "little")
        return value or DEFAULT_INITRD_ADDR_MAX

    @property
    def symbols(self):
        """A SymbolTable for diagnostics, or None: the ELF's .symtab, else a System.map
        beside the kernel file. Built on first use (it takes a while for a vmlinux)."""
        if self._symbols is None:
            self._symbols = False
            from vmm.loader.symbols import SymbolTable
            candidates = []
            if self.source is not None:
                if self.kind == "elf" and self.setup_header is None:
                    candidates.append(lambda: SymbolTable.from_elf(self.source))
                candidates.append(lambda: SymbolTable.from_system_map(
                    self.source.with_name("System.map")))
            for make in candidates:
                try:
                    self._symbols = make()
                    break
                except LoaderError:
                    continue
        return self._symbols or None


MODES = ("auto", "elf", "bzimage")
#: How much of the file is read to recognise it (covers the whole setup header).
_HEAD_SIZE = 4096


def load_kernel(mem, path: str | Path, *, mode: str = "auto") -> LoadedKernel:
    """Load a kernel into guest memory.

    Args:
        mem: the guest's GuestMemory.
        path: an ELF (vmlinux, or a static bare-metal test guest) or a bzImage.
        mode: "auto" — ELF as is; bzImage decompressed here when possible, else run
            through its own decompressor (see LoadedKernel.fallback_reason);
            "elf" — a bzImage must be decompressed here (error if it cannot);
            "bzimage" — use the bzImage's in-guest decompressor.
    Returns:
        A LoadedKernel.
    Raises:
        LoaderError: ``"<path>: <what is wrong>"``, one line.
    """
    from vmm.loader import bzimage, elf

    if mode not in MODES:
        raise LoaderError(f"unknown kernel mode {mode!r} (use one of {', '.join(MODES)})")
    path = Path(path)
    from vmm.hostfiles import HostFileError, open_regular
    try:
        f = open_regular(path, "kernel")      # a FIFO would block open() forever
    except HostFileError as e:
        raise LoaderError(str(e)) from None
    except OSError as e:
        raise LoaderError(f"{path}: cannot open kernel: {e.strerror}") from None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEAD_SIZE)
            if elf.is_elf(head):
                if mode == "bzimage":
                    raise LoaderError("is an ELF file, not a bzImage (use mode elf or auto)")
                image = elf.load_elf(mem, f, size)
                return LoadedKernel(entry=image.physical_entry(), kind="elf",
                                    setup_header=None, load_end=image.load_end, source=path)
            if not size:
                raise LoaderError("file is empty")
            hdr = bzimage.parse_setup_header(head, size)
            fallback_reason = None
            codec = None
            if mode in ("auto", "elf"):
                from vmm.loader import decompress  # (lzma, bz2, ...: only for a bzImage)
                try:
                    f.seek(hdr.setup_size + hdr.payload_offset)
                    payload = f.read(hdr.payload_length)
                    codec = decompress.detect_codec(payload)
                    if codec is None:
                        raise LoaderError(
                            f"unknown payload compression (first bytes {payload[:6].hex()})")
                    vmlinux = decompress.decompress(payload, codec, mem.size)
                    del payload
                    if not elf.is_elf(vmlinux):
                        raise LoaderError(f"decompressed {codec} payload is not an ELF vmlinux")
                    image = elf.load_elf_bytes(mem, vmlinux)
                    return LoadedKernel(entry=image.physical_entry(), kind="elf",
                                        setup_header=hdr.raw, load_end=image.load_end,
                                        codec=codec, source=path)
                except LoaderError as e:
                    if mode == "elf":
                        raise LoaderError(f"cannot decompress the bzImage here: {e}") from None
                    fallback_reason = str(e)
            addr, end = bzimage.load_protected_mode(mem, f, hdr, size)
            return LoadedKernel(entry=addr + bzimage.ENTRY_64_OFFSET, kind="bzimage",
                                setup_header=hdr.raw, load_end=end, codec=codec, source=path,
                                fallback_reason=fallback_reason)
    except LoaderError as e:
        raise LoaderError(f"{path}: {e}") from None
    except OSError as e:
        raise LoaderError(f"{path}: read error: {e.strerror or e}") from None
    except MemoryError:
        raise LoaderError(f"{path}: out of host memory while loading the kernel") from None


from vmm.loader.initrd import load_initrd  # noqa: E402
from vmm.loader.symbols import SymbolTable  # noqa: E402

__all__ = ["LoaderError", "LoadedKernel", "load_kernel", "load_initrd", "SymbolTable", "MODES"]
