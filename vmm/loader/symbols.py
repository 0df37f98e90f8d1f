"""Kernel symbol tables for diagnostics: name the function at a guest RIP.

Two sources: the ``.symtab`` of an unstripped ELF (a vmlinux; parsed with pyelftools)
or a ``System.map`` (``nm -n`` output). Addresses are kernel *virtual* addresses
(0xffffffff81xxxxxx), which is what a failing vCPU's RIP holds.
"""

from __future__ import annotations

import bisect
import io
from pathlib import Path

from vmm.loader.errors import LoaderError

#: System.map symbol types that name code (nm: t/T text, w/W weak).
_TEXT_TYPES = frozenset("tTwW")
#: ELF section flag: the section holds executable code.
SHF_EXECINSTR = 0x4


class SymbolTable:
    """Sorted (address, size, name) triples with bisect lookup.

    Args:
        symbols: iterable of (address, size, name); size 0 means "up to the next symbol".
    """

    def __init__(self, symbols):
        entries = sorted((a, s, n) for a, s, n in symbols if n)
        self._addrs = [a for a, _, _ in entries]
        self._entries = []
        for i, (addr, size, name) in enumerate(entries):
            if size <= 0:
                j = bisect.bisect_right(self._addrs, addr)
                size = (self._addrs[j] - addr) if j < len(self._addrs) else 0
            self._entries.append((addr, size, name))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, addr: int) -> str | None:
        """``"func+0x1a/0x40"`` for the function containing ``addr``, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        # Several symbols can share an address; walk back to the widest that covers addr.
        while i >= 0:
            start, size, name = self._entries[i]
            if start <= addr < start + size:
                return f"{name}+{addr - start:#x}/{size:#x}"
            if i == 0 or self._entries[i - 1][0] != start:
                return None
            i -= 1
        return None

    @classmethod
    def from_elf(cls, source: str | Path | bytes) -> "SymbolTable":
        """Function symbols (STT_FUNC) from an ELF's ``.symtab``.

        Raises:
            LoaderError: not an ELF, or it has no symbol table (stripped).
        """
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            if isinstance(source, (bytes, bytearray)):
                return cls._from_elffile(ELFFile(io.BytesIO(source)))
            with open(source, "rb") as f:
                return cls._from_elffile(ELFFile(f))
        except OSError as e:
            raise LoaderError(f"{source}: {e.strerror}") from None
        except LoaderError:
            raise
        except (ELFError, Exception) as e:  # pyelftools raises assorted types on bad input
            raise LoaderError(f"cannot read ELF symbols: {e}") from None

    @classmethod
    def _from_elffile(cls, elf) -> "SymbolTable":
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise LoaderError("ELF has no .symtab (stripped)")
        # Assembly entry points (startup_64, entry_SYSCALL_64: SYM_CODE_START) are
        # STT_NOTYPE, so take those too when they sit in an executable section.
        exec_sections = {i for i, sec in enumerate(elf.iter_sections())
                         if sec["sh_flags"] & SHF_EXECINSTR}
        syms = []
        for s in symtab.iter_symbols():
            kind, shndx = s["st_info"]["type"], s["st_shndx"]
            if not s["st_value"] or not s.name or s.name.startswith((".L", "$")):
                continue
            if kind == "STT_FUNC" or (kind == "STT_NOTYPE" and isinstance(shndx, int)
                                      and shndx in exec_sections):
                syms.append((s["st_value"], s["st_size"], s.name))
        return cls(syms)

    @classmethod
    def from_system_map(cls, path: str | Path) -> "SymbolTable":
        """Text symbols from a System.map (``address type name`` per line).

        Raises:
            LoaderError: the file cannot be read or has no text symbols.
        """
        syms = []
        try:
            with open(path, "r", encoding="ascii", errors="replace") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                        continue
                    try:
                        syms.append((int(parts[0], 16), 0, parts[2]))
                    except ValueError:
                        continue
        except OSError as e:
            raise LoaderError(f"{path}: {e.strerror}") from None
        if not syms:
            raise LoaderError(f"{path}: no text symbols (not a System.map?)")
        return cls(syms)
