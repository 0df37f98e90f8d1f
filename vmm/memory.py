"""Guest RAM: sizes, regions and bounds-checked access by guest physical address.

Guest memory is one anonymous host mapping. Below 4 GiB it is mapped from guest
physical address 0 up to the MMIO gap (layout.MMIO_GAP_START); anything beyond that
continues at 4 GiB, the way PC firmware lays RAM around the PCI hole.
"""

from __future__ import annotations

import mmap
import re
import threading
from collections import namedtuple

from vmm.arch.x86_64 import layout
from vmm.errors import UserError


class GuestMemoryError(UserError):
    """A guest physical access outside RAM, or an unusable memory size."""


#: Smallest and largest guest RAM pyvmm accepts.
MIN_MEM_SIZE = 2 * layout.MiB
MAX_MEM_SIZE = 1 << 40  # 1 TiB: far above anything a host mmap would grant

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": layout.MiB, "K": layout.KiB, "M": layout.MiB, "G": layout.GiB, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a memory size: ``512M``, ``1G``, ``2048K``, or a bare number of MiB.

    Args:
        text: the size as written by a user, or an int (already bytes).
    Returns:
        The size in bytes.
    Raises:
        GuestMemoryError: the text is not a size, or is zero.
    """
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise GuestMemoryError(f"invalid memory size {text!r} (use e.g. 512M, 1G or 256)")
        size = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if size <= 0:
        raise GuestMemoryError(f"memory size must be positive, got {text!r}")
    return size


class Region(namedtuple("Region", "guest_addr size host_offset")):
    """One contiguous range of guest RAM, backed at ``host_offset`` in the mapping.

    (Immutable records on the start-up path are namedtuples, not dataclasses: importing
    dataclasses costs ~8 ms of the VMM's start-up.)
    """

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_regions(size: int) -> list[Region]:
    """Split ``size`` bytes of RAM around the MMIO gap below 4 GiB."""
    low = min(size, layout.MMIO_GAP_START)
    regions = [Region(0, low, 0)]
    if size > low:
        regions.append(Region(layout.MMIO_GAP_END, size - low, low))
    return regions


def _lock_barrier(_lock=threading.Lock()) -> None:
    with _lock:  # an atomic read-modify-write: a full barrier on x86
        pass


try:
    from vmm._shim import lib as _shim_lib
except ImportError:  # the shim is not built: a slower barrier that is still full
    _shim_lib = None

#: ``memory_barrier()``: a full memory barrier. A store to guest memory before it is
#: visible to every vCPU before any load after it is made. x86 may let a load pass an
#: earlier store (the store waits in the CPU's store buffer), and nothing in Python
#: code prevents that; virtio's event-idx protocol (§2.7.10) needs "store our index,
#: barrier, load the other side's index" on both sides. This is the shim's ``shim_mb``
#: (mfence), or without the shim a lock round trip.
memory_barrier = _shim_lib.shim_mb if _shim_lib is not None else _lock_barrier

#: MAP_NORESERVE where the mmap module names it (no swap reserved for the whole mapping
#: up front), else 0 and the host's overcommit policy decides.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)

#: :meth:`GuestMemory.save_to` compares RAM against zeros a chunk at a time, then the
#: pages of each non-zero chunk, and writes only non-zero pages: the file's holes are
#: exactly the zero pages (which ``cp`` and ``tar -S`` then keep as holes too).
_SAVE_CHUNK = 64 * layout.KiB
_SAVE_PAGE = 4 * layout.KiB


def _checked_size(size: int) -> int:
    """``size`` rounded up to 2 MiB, or GuestMemoryError when out of range."""
    size = (size + 2 * layout.MiB - 1) & ~(2 * layout.MiB - 1)
    if size < MIN_MEM_SIZE or size > MAX_MEM_SIZE:
        raise GuestMemoryError(
            f"memory size {size >> 20} MiB is out of range "
            f"({MIN_MEM_SIZE >> 20} MiB to {MAX_MEM_SIZE >> 30} GiB)")
    return size


class GuestMemory:
    """Guest RAM backed by one anonymous mapping (or, through :meth:`from_file`, by a
    private copy-on-write mapping of a saved RAM file).

    Args:
        size: bytes of RAM (see :func:`parse_size`); rounded up to 2 MiB.
    Raises:
        GuestMemoryError: the size is out of range or the host refuses the mapping.
    """

    #: The file this memory was mapped from (:meth:`from_file`), or None.
    backing_path: str | None = None

    def __init__(self, size: int):
        size = _checked_size(size)
        try:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                | _MAP_NORESERVE)
        except (OSError, OverflowError) as e:
            raise GuestMemoryError(f"cannot allocate {size >> 20} MiB of guest memory: {e}") from None
        try:
            mapping.madvise(mmap.MADV_MERGEABLE)
        except (AttributeError, OSError):
            pass
        self._attach(mapping, size)

    @classmethod
    def from_file(cls, path: str, size: int) -> "GuestMemory":
        """Guest RAM mapped copy-on-write from a file written by :meth:`save_to`.

        The mapping is ``MAP_PRIVATE``: nothing is read up front (a page is loaded from
        the file when the guest or the VMM first touches it), a write copies that one
        page into this process, the file is never written, and any number of VMs can
        map one file and share its unmodified pages through the page cache. The file
        must stay in place (and unmodified: it is not copied) for the mapping's life.

        Args:
            path: the RAM file.
            size: the guest's RAM size in bytes (a valid :class:`GuestMemory` size,
                i.e. a multiple of 2 MiB); the file must hold exactly this many bytes.
        Returns:
            A GuestMemory with the same regions as ``GuestMemory(size)``.
        Raises:
            GuestMemoryError: the size is unusable, the file cannot be opened or mapped,
                or its size differs.
        """
        import os
        if _checked_size(size) != size:
            raise GuestMemoryError(f"memory size {size} is not a multiple of 2 MiB")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise GuestMemoryError(f"cannot open guest memory file {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise GuestMemoryError(
                    f"guest memory file {path} holds {st.st_size} bytes, expected {size}")
            # A private mapping of a read-only fd may still be PROT_WRITE: writes go to
            # private copies of the pages, never to the file.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map guest memory file {path}: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
        finally:
            os.close(fd)
        # No MADV_MERGEABLE here: unmodified pages are shared already, by the page cache.
        self = cls.__new__(cls)
        self._attach(mapping, size)
        self.backing_path = path
        return self

    def _attach(self, mapping: mmap.mmap, size: int) -> None:
        self._map = mapping
        self.size = size
        self.regions = ram_regions(size)
        #: ``(guest_addr, end, host_offset)`` of each region, for hot paths that check
        #: bounds inline (virtqueues) and then index :attr:`host_view` directly.
        self.spans: tuple[tuple[int, int, int], ...] = tuple(
            (r.guest_addr, r.end, r.host_offset) for r in self.regions)
        self._view = memoryview(self._map)
        self._u16 = self._view.cast("H")

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        if self._map is not None:
            self._u16.release()
            self._view.release()
            self._map.close()
            self._map = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- saving --------------------------------------------------------------------
    def save_to(self, path: str) -> int:
        """Write guest RAM to a new sparse file of exactly :attr:`size` bytes.

        Zero pages are not stored (they are holes), so the file takes about as much disk
        as the guest has non-zero RAM; reading an untouched page of an anonymous mapping
        maps the kernel's shared zero page, so this allocates no RAM either. The file is
        fsynced before this returns. The vCPUs must be paused (nothing may write RAM
        meanwhile).

        The file must not exist yet: it is created, never truncated, so a RAM file that
        some VM maps with :meth:`from_file` (perhaps this one) is never changed under it.
        On a failure the partial file is removed.

        Args:
            path: the file to create.
        Returns:
            The number of bytes actually stored (the non-zero pages).
        Raises:
            GuestMemoryError: the file exists, or cannot be created or written.
        """
        import os
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise GuestMemoryError(f"{path} exists; guest memory is saved to a new file only") from None
        except OSError as e:
            raise GuestMemoryError(f"cannot create {path}: {e.strerror}") from None
        try:
            stored = self._write_nonzero(fd)
            os.ftruncate(fd, self.size)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise GuestMemoryError(f"cannot write guest memory to {path}: {e.strerror}") from None
        os.close(fd)
        return stored

    def _write_nonzero(self, fd: int) -> int:
        """pwrite every non-zero page of RAM at its host offset (runs of them coalesced)."""
        import os
        m, view, size = self._map, self._view, self.size
        chunk, page = _SAVE_CHUNK, _SAVE_PAGE
        zero_chunk, zero_page = bytes(chunk), bytes(page)
        stored = 0
        run_start = run_end = 0        # the pending run of non-zero pages [start, end)

        def flush() -> int:
            n = 0
            while run_start + n < run_end:   # pwrite may write less than asked
                n += os.pwrite(fd, view[run_start + n:run_end], run_start + n)
            return n

        for off in range(0, size, chunk):
            data = m[off:off + chunk]        # one copy, then a C memcmp against zeros
            if data == zero_chunk:
                continue
            for p in range(0, len(data), page):
                if data[p:p + page] == zero_page:
                    continue
                start = off + p
                if start != run_end:
                    stored += flush()
                    run_start = start
                run_end = start + page
        stored += flush()
        return stored

    @property
    def host_buffer(self) -> mmap.mmap:
        """The whole mapping (for registering with KVM and for the C shim)."""
        return self._map

    @property
    def host_view(self) -> memoryview:
        """A view of the whole mapping, indexed by host offset (see :meth:`translate`).

        Unchecked: only index it with an offset range that :meth:`translate` (or an
        inline check against :attr:`spans`) has already placed inside one region.
        """
        return self._view

    @property
    def host_u16(self) -> memoryview:
        """The mapping as native (little-endian on x86) 16-bit words: item ``i`` is the
        word at host offset ``2*i``. Loading or storing one item is a single aligned
        memory access, so a vCPU never sees half of a store, nor we half of its store
        (``struct.pack_into`` zero-fills its target first, and ``int.from_bytes`` and
        slice copies may go byte by byte). Unchecked, like :attr:`host_view`.
        """
        return self._u16

    # -- address translation ----------------------------------------------------------
    def translate(self, gpa: int, length: int) -> int:
        """Host offset of ``[gpa, gpa+length)``, or -1 unless it lies inside one region.

        The non-raising twin of :meth:`view`'s check, for hot paths: the result indexes
        :attr:`host_view`.
        """
        if length < 0:
            return -1
        end = gpa + length
        for start, stop, host in self.spans:
            if start <= gpa and end <= stop:
                return host + (gpa - start)
        return -1

    def _offset(self, gpa: int, length: int) -> int:
        """Host offset of ``[gpa, gpa+length)``; the range must lie in one region."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for r in self.regions:
            if r.guest_addr <= gpa and gpa + length <= r.end:
                return r.host_offset + (gpa - r.guest_addr)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa+length)`` lies entirely inside one RAM region."""
        return length >= 0 and any(r.guest_addr <= gpa and gpa + length <= r.end
                                   for r in self.regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of guest RAM (raises outside RAM)."""
        off = self._offset(gpa, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
