"""virtio-blk device model (virtio 1.2 §5.2): virtio only, the data is a disk backend's.

Requests are served synchronously by :meth:`VirtioBlk.process_queue`, which the
transport calls on the VMM's I/O thread (see mmio.py, "Locking"). This module parses
requests, checks them against the spec and answers with a status; the bytes come from
and go to a :class:`vmm.disk.DiskBackend` (a raw image, or for snapshot disks a
copy-on-write overlay over it: see vmm/disk/), which moves them with
``os.preadv``/``os.pwritev`` straight between the image and views of guest memory; no
request data is copied through Python objects.

What ``cache=`` and ``snapshot=`` mean is the backends' (vmm/disk/raw.py, overlay.py):
FLUSH asks the backend to make completed writes durable.

Snapshot state: :meth:`VirtioBlk.save` gives ``capacity`` (sectors), ``features``
(offered) and ``serial`` (the 20 GET_ID bytes); the transport nests it in its own state
and calls :meth:`VirtioBlk.restore` (vmm/devices/virtio/mmio.py, "Snapshot state").
Capacity and features are derived from the disk and the options, so restore only checks
that the rebuilt device has the same ones (the guest's driver negotiated with them);
the serial is restored (a default one comes from the image's inode, which a copied
image does not keep). The per-activation state (queues, memory) comes back through the
transport's activation. The disk's contents are not in the state: the machine records
the image's path, size and mtime as dependencies; a snapshot disk's overlay, which
lives in no image, is saved by :meth:`VirtioBlk.save_disk` into the snapshot directory
and reopened by ``VirtioBlk(path, ..., snapshot=True, saved_disk=(directory, state))``
-- or, as one self-describing file, by :meth:`VirtioBlk.save_overlay` and
``VirtioBlk(path, ..., snapshot=True, overlay_file=path)``.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Sequence

from vmm.devices.state import U64_MAX, DeviceStateError, blob, fields, uint
from vmm.disk import CACHE_MODES, DiskBackend, DiskError, open_disk  # noqa: F401 (API)
from vmm.disk.empty import EmptyDisk
from vmm.log import get_logger, log_once
from vmm.memory import GuestMemory

from .mmio import VIRTIO_F_VERSION_1
from .queue import DescriptorChain, Queue

log = get_logger(__name__)

#: A disk pyvmm cannot use, or a bad disk option (one line, meant for the user): the
#: disk backends' error, so a caller catches one class for the device and its image.
BlockError = DiskError


#: Virtio device ID of a block device (§5.2.1).
VIRTIO_ID_BLOCK = 2

# --- Feature bits (§5.2.3, §6) -------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- Request types (§5.2.6) ----------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# --- Status values (§5.2.6) ----------------------------------------------------------
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: Flag of a discard/write-zeroes segment (§5.2.6: struct virtio_blk_discard_write_zeroes).
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

#: Bytes of a GET_ID answer (§5.2.6: "VIRTIO_BLK_ID_BYTES").
VIRTIO_BLK_ID_BYTES = 20

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT  # §5.2.6: sector numbers are always in 512-byte units

#: QueueNumMax of the one request queue.
QUEUE_SIZE = 256
#: Data segments per request (§5.2.4 seg_max): the queue size less header and status.
SEG_MAX = QUEUE_SIZE - 2
#: Largest discard / write-zeroes per segment, in sectors (4 GiB).
MAX_DISCARD_SECTORS = 1 << 23
MAX_WRITE_ZEROES_SECTORS = 1 << 23
#: Discard granularity in sectors: 4 KiB, the usual host filesystem block.
DISCARD_SECTOR_ALIGNMENT = 8
#: Requests carry at most one discard / write-zeroes segment (max_*_seg in config).
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SEG = 1

_HEADER = struct.Struct("<IIQ")  # §5.2.6: le32 type, le32 reserved, le64 sector
_SEGMENT = struct.Struct("<QII")  # §5.2.6: le64 sector, le32 num_sectors, le32 flags

#: Fields of struct virtio_blk_config (§5.2.4): name -> (offset, width).
CONFIG_FIELDS = {
    "capacity": (0, 8),
    "size_max": (8, 4),
    "seg_max": (12, 4),
    "geometry.cylinders": (16, 2),
    "geometry.heads": (18, 1),
    "geometry.sectors": (19, 1),
    "blk_size": (20, 4),
    "topology.physical_block_exp": (24, 1),
    "topology.alignment_offset": (25, 1),
    "topology.min_io_size": (26, 2),
    "topology.opt_io_size": (28, 4),
    "writeback": (32, 1),
    "num_queues": (34, 2),
    "max_discard_sectors": (36, 4),
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
}
CONFIG_SIZE = 60  # through unused1[3] after write_zeroes_may_unmap

#: Offered by every drive; an empty one (and a disk inserted into it) offers no more.
_BASE_FEATURES = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX)
                  | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH))


def _serial_bytes(serial: str | None) -> bytes | None:
    """The GET_ID bytes of a ``serial=`` option (None: derive one from the image)."""
    if serial is None:
        return None
    try:
        sid = serial.encode("ascii")
    except UnicodeEncodeError:
        sid = b""
    if not sid and serial or len(sid) > VIRTIO_BLK_ID_BYTES:
        raise BlockError(f"disk serial {serial!r} must be at most 20 ASCII characters")
    return sid


def _release_views(views: list[memoryview]) -> None:
    for v in views:
        v.release()


class VirtioBlk:
    """A virtio block device serving one disk.

    Args:
        path: a raw disk image (regular file) or a block device, opened with
            :func:`vmm.disk.open_disk`; or an open :class:`~vmm.disk.DiskBackend`,
            which the device then owns (closes).
        read_only: open read-only, offer VIRTIO_BLK_F_RO and refuse every write.
        serial: the GET_ID answer (at most 20 ASCII bytes); by default one derived
            from the image's device and inode numbers.
        cache: ``writeback``, ``none`` or ``unsafe`` (vmm/disk/raw.py).
        snapshot: keep the image unmodified and send writes to a throwaway overlay
            (vmm/disk/overlay.py). With ``read_only`` it changes nothing: a read-only
            disk needs no overlay.
        saved_disk: ``(directory, state)`` where ``state`` is what :meth:`save_disk`
            returned for this disk into snapshot ``directory``: a snapshot disk's
            overlay starts with the saved one's contents (copied: the snapshot's files
            are only read). Not with a ``DiskBackend`` for ``path``.
        overlay_file: the same from the one file :meth:`save_overlay` wrote; needs
            ``snapshot`` (and not ``read_only``).
        inserted: the disk was put into an empty drive after the guest's driver had
            negotiated (:meth:`insert`): offer what an empty drive offers, as that
            drive did (a restore of a VM saved after the insertion rebuilds it so).
            ``path=None`` is an empty drive (vmm/disk/empty.py).
    Raises:
        BlockError: the image is missing, a directory, unreadable, locked by another
            VM, no overlay file can be created, or an option is invalid.
        DeviceStateError: ``saved_disk`` does not fit these options (an overlay for a
            disk that is not a snapshot disk, or none for one); a saved overlay that
            cannot be reopened raises ``OverlayStateError`` (a BlockError); both are
            ValueErrors.
    """

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str | os.PathLike | DiskBackend, *, read_only: bool = False,
                 serial: str | None = None, cache: str = "writeback",
                 snapshot: bool = False,
                 saved_disk: tuple[str | os.PathLike, dict] | None = None,
                 overlay_file: str | os.PathLike | None = None, inserted: bool = False):
        sid = _serial_bytes(serial)  # checked first: a bad option opens nothing
        if path is None:
            path = EmptyDisk()
        overlay_from = None
        if (saved_disk is not None or overlay_file is not None) \
                and isinstance(path, DiskBackend):
            raise BlockError("a saved disk needs a path, not an open disk backend")
        if saved_disk is not None:
            directory, disk_state = saved_disk
            fields(disk_state, "virtio-blk disk", ("overlay",))
            overlay_state = disk_state["overlay"]
            if (overlay_state is not None) != (snapshot and not read_only):
                raise DeviceStateError(
                    f"{os.fspath(path)}: the snapshot has "
                    f"{'an' if overlay_state is not None else 'no'} overlay for this disk, "
                    f"which is {'' if snapshot and not read_only else 'not '}a "
                    "writable snapshot disk")
            if overlay_state is not None:
                overlay_from = (directory, overlay_state)
        if isinstance(path, DiskBackend):
            backend = path
        else:
            backend = open_disk(path, read_only=read_only, cache=cache, snapshot=snapshot,
                                overlay_from=overlay_from, overlay_file=overlay_file)
        self.cache = cache
        #: An empty drive (vmm/disk/empty.py) until :meth:`insert` gives it a disk.
        self.empty = isinstance(backend, EmptyDisk)
        self.inserted = inserted
        self._use(backend, read_only, snapshot, sid)
        features = _BASE_FEATURES
        if self.empty or inserted:
            pass    # what the empty drive offered when the driver negotiated
        elif self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            if backend.supports_discard:
                features |= 1 << VIRTIO_BLK_F_DISCARD
            if backend.supports_write_zeroes:
                features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        self.features = features
        self._logged: set = set()
        self._iov_max = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
        self.reset()

    def _use(self, backend: DiskBackend, read_only: bool, snapshot: bool,
             sid: bytes | None) -> None:
        """Serve ``backend``: the attributes and config space derived from it."""
        #: Where the data is (vmm/disk): every request's I/O goes through it.
        self.backend = backend
        self.path = backend.path
        self.read_only = read_only = read_only or backend.read_only
        self.snapshot = snapshot and not read_only
        size = backend.size
        if size % SECTOR_SIZE:
            log.warning("%s: size is not a multiple of 512; the last %d bytes are not "
                        "visible to the guest", self.path, size % SECTOR_SIZE)
        #: Capacity in 512-byte sectors (§5.2.4 capacity).
        self.capacity = size >> SECTOR_SHIFT
        if sid is None:
            sid = backend.identity[:VIRTIO_BLK_ID_BYTES].encode("ascii")
        self._serial = sid.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self._config = self._build_config()

    def insert(self, path: str | os.PathLike | DiskBackend, *, read_only: bool = False,
               serial: str | None = None, cache: str = "writeback",
               snapshot: bool = False) -> None:
        """Put a disk into this empty drive (the options are the constructor's).

        The caller holds off request processing (the transport's
        ``change_device``) and then raises the configuration-change interrupt
        (§4.2.2: config_generation moves; the driver re-reads capacity, §5.2.4). The
        features the driver negotiated stay as they are (§2.2: they are fixed once
        FEATURES_OK is set): a read-only disk is not announced with
        VIRTIO_BLK_F_RO but every write to it still fails (§5.2.6.2), and discard /
        write-zeroes are not offered.

        Raises:
            BlockError: the drive is not empty, or the disk cannot be opened (the
                drive stays empty).
        """
        if not self.empty:
            raise BlockError(f"cannot insert {os.fspath(path)}: the drive holds {self.path}")
        sid = _serial_bytes(serial)
        backend = path if isinstance(path, DiskBackend) else \
            open_disk(path, read_only=read_only, cache=cache, snapshot=snapshot)
        self.cache = cache
        self._use(backend, read_only, snapshot, sid)
        self.empty = False
        self.inserted = True

    def _build_config(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        values = {
            "capacity": self.capacity,
            "seg_max": SEG_MAX,
            "blk_size": SECTOR_SIZE,
            "num_queues": 1,
            "max_discard_sectors": MAX_DISCARD_SECTORS,
            "max_discard_seg": MAX_DISCARD_SEG,
            "discard_sector_alignment": DISCARD_SECTOR_ALIGNMENT,
            "max_write_zeroes_sectors": MAX_WRITE_ZEROES_SECTORS,
            "max_write_zeroes_seg": MAX_WRITE_ZEROES_SEG,
            "write_zeroes_may_unmap": 1,
        }
        for name, value in values.items():
            off, width = CONFIG_FIELDS[name]
            cfg[off:off + width] = value.to_bytes(width, "little")
        return bytes(cfg)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the backend: this drops the lock on the image and discards an overlay."""
        self.backend.close()

    def __enter__(self) -> "VirtioBlk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_once(self, key, msg: str, *args) -> None:
        log_once(log, self._logged, key, "virtio-blk %s: " + msg, self.path, *args)

    # -- snapshot state (see the module docstring) -------------------------------------
    def save(self) -> dict:
        """The device's state as plain data: ``capacity``, ``features``, ``serial``."""
        return {"v": 1, "capacity": self.capacity, "features": self.features,
                "serial": self._serial}

    def restore(self, state: dict) -> None:
        """Check that this device serves the disk ``state`` (from :meth:`save`) was
        saved with -- same capacity and offered features -- and take its serial.

        Raises:
            DeviceStateError: a bad value, or another capacity or feature set; nothing
                is changed.
        """
        what = "virtio-blk"
        fields(state, what, ("capacity", "features", "serial"))
        capacity = uint(state, "capacity", what, U64_MAX)
        features = uint(state, "features", what, U64_MAX)
        serial = blob(state, "serial", what, VIRTIO_BLK_ID_BYTES, exact=True)
        if capacity != self.capacity:
            raise DeviceStateError(f"{self.path}: the snapshot's disk had {capacity} "
                                   f"sectors, this one has {self.capacity}")
        if features != self.features:
            raise DeviceStateError(f"{self.path}: the snapshot's disk offered features "
                                   f"{features:#x}, this one offers {self.features:#x} "
                                   "(another read-only setting?)")
        self._serial = serial

    def save_disk(self, directory: str | os.PathLike, name: str) -> dict:
        """Save what of the disk is in no image -- a snapshot disk's overlay -- into
        snapshot ``directory`` (files named from ``name``, vmm/disk/overlay.py
        ``Overlay.save_to``); call it with the VM paused.

        Returns:
            ``{"v": 1, "overlay": the overlay's state or None}``: what ``saved_disk=``
            takes back (with ``directory``) to reopen the disk.
        Raises:
            OSError: the files cannot be written; OverlayStateError: a bad ``name``.
        """
        return {"v": 1, "overlay": self.backend.save_to(directory, name)}

    def save_overlay(self, path: str | os.PathLike) -> None:
        """Save a snapshot disk's overlay into the one self-describing file ``path``
        (vmm/disk/overlay.py ``Overlay.save_file``), which ``overlay_file=`` reopens;
        call it with the VM paused.

        Raises:
            BlockError: this is not a writable snapshot disk (it has no overlay).
            OSError: the file cannot be written.
        """
        save_file = getattr(self.backend, "save_file", None)
        if save_file is None:
            raise BlockError(f"{self.path} is not a snapshot disk: it has no overlay to save")
        save_file(path)

    # -- VirtioDevice ----------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        """Read a config field (§5.2.4) with its own width.

        §4.2.2.2: the driver uses 8/16/32-bit aligned accesses matching each field;
        64-bit fields may also be read as two 32-bit halves. Anything else reads 0.
        """
        for off, width in CONFIG_FIELDS.values():
            if off <= offset and offset + size <= off + width and offset % size == 0 \
                    and (size == width or (width == 8 and size == 4)):
                return int.from_bytes(self._config[offset:offset + size], "little")
        self._log_once(("cfg-read",), "invalid config read of %d bytes at %#x",
                       size, offset)
        return 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        # The only writable field, writeback, needs VIRTIO_BLK_F_CONFIG_WCE: not offered.
        self._log_once(("cfg-write",), "config write at %#x ignored", offset)

    def activate(self, queues: Sequence[Queue], mem: GuestMemory,
                 signal_used: Callable[[int], None]) -> None:
        self._queues = list(queues)
        self._mem = mem
        self._signal_used = signal_used

    def reset(self) -> None:
        self._queues: list[Queue] = []
        self._mem: GuestMemory | None = None
        self._signal_used: Callable[[int], None] | None = None

    def process_queue(self, index: int) -> None:
        """Serve every available request on queue ``index``, then signal the driver.

        Raises:
            QueueError: the ring is broken (the transport sets DEVICE_NEEDS_RESET).
        """
        if index >= len(self._queues) or self._mem is None:
            return
        q = self._queues[index]
        pop, add_used, handle = q.pop, q.add_used, self._handle
        done = 0
        try:
            while (chain := pop()) is not None:
                # The used element is written only once the request has completed, and
                # published at once: a polling driver can refill while we go on.
                add_used(chain.head_index, handle(chain))
                done += 1
        finally:
            if done and self._signal_used:
                self._signal_used(index)

    # -- requests (§5.2.6) -------------------------------------------------------------------
    # Data moves through ``GuestMemory.host_view`` at the host offsets the queue's walk
    # computed for each descriptor (``Descriptor.host``) after checking the whole buffer
    # is RAM; a "segment" below is such a ``(host offset, length)`` pair, and a part of
    # one is still inside the checked buffer.
    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written incl. status)."""
        if chain.structural:
            # The chain's end is unknown, so is its status byte: complete it empty.
            self._log_once(("chain",), "malformed descriptor chain: %s",
                           chain.error)
            return 0
        descs = chain.descriptors
        # The status byte is the last byte of the device-writable part (§5.2.6 struct
        # virtio_blk_req; §2.7.4 message framing: any descriptor layout is allowed).
        for status_desc in reversed(descs):
            if status_desc.write_only and status_desc.len:
                break
        else:
            status_desc = None
        if status_desc is None or not status_desc.in_ram:
            self._log_once(("nostatus",), "request without a usable status byte")
            return 0
        view = self._mem.host_view
        status_at = status_desc.host + status_desc.len - 1
        if chain.error:
            self._log_once(("bad",), "bad descriptor: %s", chain.error)
            view[status_at] = VIRTIO_BLK_S_IOERR
            return 1
        # No error: every descriptor is in RAM and has its host offset.
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        r_total = w_total = 0
        for d in descs:
            if d.write_only:
                writable.append((d.host, d.len))
                w_total += d.len
            elif writable:
                # §2.7.4.2: device-readable descriptors come before device-writable ones.
                view[status_at] = VIRTIO_BLK_S_IOERR
                return 1
            else:
                readable.append((d.host, d.len))
                r_total += d.len
        status, data_written = self._serve(view, readable, r_total, writable, w_total)
        view[status_at] = status
        return data_written + 1

    def _serve(self, view: memoryview, readable: list[tuple[int, int]], r_total: int,
               writable: list[tuple[int, int]], w_total: int) -> tuple[int, int]:
        """Run one well-formed request; returns (status, data bytes written)."""
        if r_total < _HEADER.size:
            return VIRTIO_BLK_S_IOERR, 0
        if readable[0][1] >= _HEADER.size:  # the usual case: the header in one buffer
            rtype, _reserved, sector = _HEADER.unpack_from(view, readable[0][0])
        else:
            hdr = bytearray(_HEADER.size)
            self._gather(readable, 0, hdr)
            rtype, _reserved, sector = _HEADER.unpack(hdr)
        # The data: what follows the header, and what precedes the status byte (the
        # last byte of the writable part, see _handle).
        if rtype == VIRTIO_BLK_T_IN:
            if writable[-1][1] == 1:  # the usual case: a 1-byte status buffer at the end
                in_data = writable[:-1]
            else:
                in_data = _slice(writable, 0, w_total - 1)
            return self._read(sector, in_data, w_total - 1)
        if rtype == VIRTIO_BLK_T_OUT:
            if len(readable) > 1 and readable[0][1] == _HEADER.size:  # header alone first
                out_data = readable[1:]
            else:
                out_data = _slice(readable, _HEADER.size, r_total - _HEADER.size)
            return self._write(sector, out_data, r_total - _HEADER.size), 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            return self._flush(), 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            # §5.2.6: 20 bytes, NUL-padded. A smaller buffer gets the first bytes (as
            # QEMU does); the spec leaves that case open.
            n = min(VIRTIO_BLK_ID_BYTES, w_total - 1)
            self._scatter(_slice(writable, 0, w_total - 1), self._serial[:n])
            return VIRTIO_BLK_S_OK, n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(rtype, readable, r_total), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _gather(self, segs: list[tuple[int, int]], start: int, out: bytearray) -> None:
        """Copy ``len(out)`` bytes at byte ``start`` of ``segs`` into ``out`` (headers only)."""
        view = self._mem.host_view
        pos = 0
        for host, n in _slice(segs, start, len(out)):
            out[pos:pos + n] = view[host:host + n]
            pos += n

    def _scatter(self, segs: list[tuple[int, int]], data: bytes) -> None:
        view = self._mem.host_view
        pos = 0
        for host, n in segs:
            if pos >= len(data):
                break
            k = min(n, len(data) - pos)
            view[host:host + k] = data[pos:pos + k]
            pos += k

    def _check_range(self, sector: int, nbytes: int) -> bool:
        """§5.2.6: data must be whole sectors inside the capacity (no u64 wraparound:
        Python ints do not overflow, and the sum is compared, not wrapped)."""
        if nbytes == 0 or nbytes % SECTOR_SIZE:
            return False
        return sector + (nbytes >> SECTOR_SHIFT) <= self.capacity

    def _views(self, segs: list[tuple[int, int]]) -> list[memoryview]:
        view = self._mem.host_view
        return [view[host:host + n] for host, n in segs if n]

    def _read(self, sector: int, segs: list[tuple[int, int]],
              nbytes: int | None = None) -> tuple[int, int]:
        """Read into ``segs`` (host segments, ``nbytes`` in all when the caller has
        summed them already) from ``sector``; returns (status, bytes read)."""
        if nbytes is None:
            nbytes = sum(n for _, n in segs)
        # _check_range, inlined on this hot path (§5.2.6: whole sectors, in capacity).
        if (nbytes == 0 or nbytes % SECTOR_SIZE
                or sector + (nbytes >> SECTOR_SHIFT) > self.capacity
                or len(segs) > self._iov_max):
            return VIRTIO_BLK_S_IOERR, 0
        view = self._mem.host_view
        views = [view[host:host + n] for host, n in segs if n]
        try:
            done = self.backend.readv(views, sector << SECTOR_SHIFT, nbytes)
        except OSError as e:
            self._log_once(("read", e.errno), "read error: %s", e.strerror)
            return VIRTIO_BLK_S_IOERR, 0
        finally:
            for v in views:  # _release_views, inlined on this hot path
                v.release()
        if done != nbytes:  # the image shrank under us
            return VIRTIO_BLK_S_IOERR, 0
        return VIRTIO_BLK_S_OK, nbytes

    def _write(self, sector: int, segs: list[tuple[int, int]],
               nbytes: int | None = None) -> int:
        """Write ``segs`` (host segments, ``nbytes`` in all when the caller has summed
        them already) at ``sector``; returns the status."""
        if self.read_only:  # §5.2.6.2: IOERR for writes to a VIRTIO_BLK_F_RO device
            return VIRTIO_BLK_S_IOERR
        if nbytes is None:
            nbytes = sum(n for _, n in segs)
        if not self._check_range(sector, nbytes) or len(segs) > self._iov_max:
            return VIRTIO_BLK_S_IOERR
        views = self._views(segs)
        try:
            done = self.backend.writev(views, sector << SECTOR_SHIFT, nbytes)
        except OSError as e:
            self._log_once(("write", e.errno), "write error: %s", e.strerror)
            return VIRTIO_BLK_S_IOERR
        finally:
            _release_views(views)
        return VIRTIO_BLK_S_OK if done == nbytes else VIRTIO_BLK_S_IOERR

    def _flush(self) -> int:
        # §5.2.6.2: data written before a completed FLUSH is on stable storage (as far
        # as the cache mode promises: the backend's business, vmm/disk/raw.py).
        try:
            self.backend.flush()
        except OSError as e:
            self._log_once(("flush", e.errno), "flush error: %s", e.strerror)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _discard_or_zero(self, rtype: int, readable: list[tuple[int, int]],
                         r_total: int) -> int:
        if self.read_only:
            return VIRTIO_BLK_S_IOERR
        discard = rtype == VIRTIO_BLK_T_DISCARD
        if not self.features >> (VIRTIO_BLK_F_DISCARD if discard
                                 else VIRTIO_BLK_F_WRITE_ZEROES) & 1:
            return VIRTIO_BLK_S_UNSUPP  # a request type whose feature was not offered
        nbytes = r_total - _HEADER.size
        # §5.2.6: the data is an array of 16-byte virtio_blk_discard_write_zeroes.
        if nbytes == 0 or nbytes % _SEGMENT.size:
            return VIRTIO_BLK_S_IOERR
        nseg = nbytes // _SEGMENT.size
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if nseg > max_seg:  # more than max_discard_seg / max_write_zeroes_seg (§5.2.4)
            return VIRTIO_BLK_S_UNSUPP
        raw = bytearray(nbytes)
        self._gather(readable, _HEADER.size, raw)
        segments = [_SEGMENT.unpack_from(raw, i * _SEGMENT.size) for i in range(nseg)]
        for sector, num, flags in segments:
            # §5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
            if discard and flags:
                return VIRTIO_BLK_S_UNSUPP
            if num > max_sectors or sector + num > self.capacity:
                return VIRTIO_BLK_S_IOERR
        backend = self.backend
        for sector, num, flags in segments:
            if num == 0:
                continue
            off, length = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            try:
                if discard:
                    backend.discard(off, length)
                else:
                    backend.write_zeroes(off, length,
                                         bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            except OSError as e:
                self._log_once(("dz", e.errno), "discard/write-zeroes error: %s", e.strerror)
                return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK


def _slice(segs: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The (addr, len) pieces covering bytes [start, start+length) of ``segs``."""
    out = []
    pos = 0
    end = start + length
    for addr, n in segs:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return out

