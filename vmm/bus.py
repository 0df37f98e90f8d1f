"""An address bus: non-overlapping address ranges, each owned by one device.

The VMM has two of these, one for port I/O and one for MMIO (kvmtool's
``ioport.c``/``mmio.c`` split). A KVM exit is decoded once into an address, a size
and (for writes) a value; the exit handler then calls :meth:`Bus.read` or
:meth:`Bus.write`, and the bus hands the owning device the *offset* into its range,
never the absolute address, so a device model does not know where it is mapped.

Every device on a bus implements :class:`BusDevice`. Values are plain ints with
little-endian semantics: a 2-byte read at offset 0 returns ``byte0 | byte1 << 8``.

An access nobody owns -- including one that starts inside a range but runs past
its end -- is answered like an empty ISA bus: reads return all-ones of the access
size (0xff, 0xffff, ...), writes are dropped. It is logged once per address, never
fatal: unclaimed accesses are logged once and answered predictably. Linux touches plenty of ports that a microVM does not
have (0x80 for I/O delays, other COM ports, the parallel port, PCI config space),
so the log level is DEBUG.

This is on the exit path, so lookups cache the last range hit (a guest usually
hammers one device at a time: the UART's THR/LSR, a virtio queue notify) and fall
back to a bisect over the sorted range starts.
"""

from __future__ import annotations

import bisect
from collections import namedtuple
from vmm.log import get_logger

__all__ = ["BusDevice", "BusError", "BusRange", "Bus"]

log = get_logger("vmm.bus")

#: How many distinct unclaimed addresses are remembered (to log each only once).
#: A guest that scans the whole MMIO hole must not grow VMM memory without bound
#: (whatever a guest controls is bounded); past this many, unclaimed accesses are no longer logged.
UNCLAIMED_LOG_LIMIT = 4096


class BusDevice:
    """What every device mapped on a :class:`Bus` implements (duck-typed: devices need
    not inherit from this; it documents the interface without importing typing, which
    costs start-up time).

    ``offset`` is relative to the start of the device's range; ``size`` is the
    access width in bytes (1, 2, 4 or 8); values are little-endian ints.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """A range could not be inserted (zero length, negative, or overlapping)."""


class BusRange(namedtuple("BusRange", "base length device name")):
    """One claimed range ``[base, base + length)``: its ``device`` and ``name``."""

    __slots__ = ()

    @property
    def end(self) -> int:
        """First address past the range."""
        return self.base + self.length


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class Bus:
    """Maps non-overlapping address ranges to devices.

    Args:
        name: Shown in log messages ("pio", "mmio").
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # Parallel sorted lists: _bases for bisect, _ranges for the payload.
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        # Last range hit as (base, end, device); one tuple so that replacing it is
        # a single atomic store even with several vCPU threads.
        self._last: tuple[int, int, BusDevice] | None = None
        self._logged: set[int] = set()
        self._log_limit_hit = False

    # --- Setup ------------------------------------------------------------------

    def insert(self, base: int, length: int, device: BusDevice, name: str | None = None) -> None:
        """Claims ``[base, base + length)`` for ``device``.

        Args:
            base: First address of the range.
            length: Number of addresses; must be positive.
            device: The :class:`BusDevice` that will see offsets ``0 .. length-1``.
            name: For log messages; defaults to the device's class name.

        Raises:
            BusError: ``length`` is not positive, ``base`` is negative, or the range
                overlaps one already inserted.
        """
        if length <= 0:
            raise BusError(f"{self.name}: range at {base:#x} has length {length}; must be > 0")
        if base < 0:
            raise BusError(f"{self.name}: negative base address {base:#x}")
        label = name if name is not None else type(device).__name__
        new = BusRange(base, length, device, label)
        i = bisect.bisect_left(self._bases, base)
        # Only the neighbours can overlap, because existing ranges are disjoint.
        if i > 0 and self._ranges[i - 1].end > base:
            raise BusError(self._overlap_msg(new, self._ranges[i - 1]))
        if i < len(self._ranges) and self._ranges[i].base < new.end:
            raise BusError(self._overlap_msg(new, self._ranges[i]))
        self._bases.insert(i, base)
        self._ranges.insert(i, new)

    def _overlap_msg(self, new: BusRange, old: BusRange) -> str:
        return (
            f"{self.name}: {new.name} at [{new.base:#x}, {new.end:#x}) overlaps "
            f"{old.name} at [{old.base:#x}, {old.end:#x})"
        )

    def ranges(self) -> list[BusRange]:
        """All claimed ranges, sorted by base address."""
        return list(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    # --- Lookup -----------------------------------------------------------------

    def _lookup(self, addr: int) -> tuple[int, int, BusDevice] | None:
        last = self._last
        if last is not None and last[0] <= addr < last[1]:
            return last
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr >= r.base + r.length:
            return None
        hit = (r.base, r.base + r.length, r.device)
        self._last = hit
        return hit

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        """Returns ``(base, device)`` for the range holding ``addr``, or None."""
        hit = self._lookup(addr)
        if hit is None:
            return None
        return hit[0], hit[2]

    # --- Access -----------------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        """Reads ``size`` bytes at ``addr``; never raises for an unclaimed address.

        Returns:
            The device's answer masked to ``size`` bytes, or all-ones of that size
            when no device owns the whole access.
        """
        hit = self._lookup(addr)
        if hit is None or addr + size > hit[1]:
            self._unclaimed("read", addr, size)
            return (1 << (8 * size)) - 1
        return hit[2].read(addr - hit[0], size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        """Writes ``value`` (``size`` bytes) at ``addr``; unclaimed writes are dropped."""
        hit = self._lookup(addr)
        if hit is None or addr + size > hit[1]:
            self._unclaimed("write", addr, size, value)
            return
        hit[2].write(addr - hit[0], size, value & ((1 << (8 * size)) - 1))

    def read_into(self, addr: int, buf: bytearray | memoryview) -> None:
        """Fills ``buf`` (1..8 bytes, e.g. ``kvm_run``'s data area) from ``addr``."""
        size = len(buf)
        buf[:] = self.read(addr, size).to_bytes(size, "little")

    def write_from(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` (1..8 bytes, little-endian) at ``addr``."""
        self.write(addr, len(data), int.from_bytes(data, "little"))

    def _unclaimed(self, kind: str, addr: int, size: int, value: int | None = None) -> None:
        if addr in self._logged:
            return
        if len(self._logged) >= UNCLAIMED_LOG_LIMIT:
            if not self._log_limit_hit:
                self._log_limit_hit = True
                log.debug("%s: more than %d unclaimed addresses; no longer logging them",
                          self.name, UNCLAIMED_LOG_LIMIT)
            return
        self._logged.add(addr)
        if value is None:
            log.debug("%s: unclaimed %d-byte read at %#x (answered %#x)",
                      self.name, size, addr, _all_ones(size))
        else:
            log.debug("%s: unclaimed %d-byte write of %#x at %#x (dropped)",
                      self.name, size, value, addr)
