"""Split virtqueues (virtio 1.2 §2.7), device side.

The driver lays out three areas in guest RAM and tells the device where they are
through the transport (vmm/devices/virtio/mmio.py):

* the descriptor table  (§2.7.5): ``size`` x {le64 addr, le32 len, le16 flags, le16 next}
* the available ring    (§2.7.6): {le16 flags, le16 idx, le16 ring[size], le16 used_event}
* the used ring         (§2.7.8): {le16 flags, le16 idx, {le32 id, le32 len}[size],
  le16 avail_event}

Everything here is read from memory the guest controls, so every index is bounded
and every address is checked against guest RAM before it is used. Two kinds of
failure are kept apart:

* :class:`QueueError` — the ring itself is unusable (avail index runs ahead, a head
  index outside the table, rings outside RAM). The transport answers it by setting
  DEVICE_NEEDS_RESET (§2.1.2); the VMM never crashes.
* ``DescriptorChain.error`` — one request is malformed (a loop, a descriptor outside
  RAM, a bad indirect table). The device completes just that chain, with an error
  status when it can find where to put one (§2.7.4).

A :class:`Queue` is not thread-safe by itself: the transport guarantees that only one
thread at a time pops from or adds to a given queue (see mmio.py, "Locking").
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from vmm.memory import GuestMemory

log = logging.getLogger(__name__)


class QueueError(Exception):
    """The driver broke the virtqueue (the device must be reset to recover)."""


# --- Feature bits implemented by this module (§6) -------------------------------------
VIRTIO_RING_F_INDIRECT_DESC = 28  # §2.7.5.3 indirect descriptor tables
VIRTIO_RING_F_EVENT_IDX = 29  # §2.7.7 / §2.7.10 used_event / avail_event

# --- Descriptor flags (§2.7.5) ---------------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# --- Ring flags (§2.7.6, §2.7.8) -------------------------------------------------------
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: Largest queue size the split format allows (§2.7: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768

DESC_SIZE = 16
USED_ELEM_SIZE = 8
#: Alignment the driver must give each area (§2.7, table "Virtqueue Part Alignment").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

_DESC = struct.Struct("<QIHH")
_U64_LIMIT = 1 << 64


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size  # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + USED_ELEM_SIZE * size  # flags, idx, ring[size], avail_event


def is_valid_queue_size(size: int, max_size: int) -> bool:
    """§2.7: the queue size is a power of two (split rings), nonzero, and the driver may
    only lower it from the device's maximum (§4.2.2 QueueNum / QueueNumMax)."""
    return 0 < size <= max_size and size & (size - 1) == 0


@dataclass(frozen=True)
class Descriptor:
    """One buffer of a chain: ``len`` bytes at guest address ``addr``.

    ``in_ram`` is False for a descriptor that points outside guest RAM (or whose
    addr+len overflows 64 bits); such a buffer must never be accessed, it is kept only
    so the device knows where the chain ends.
    """

    addr: int
    len: int
    write_only: bool
    in_ram: bool = True


@dataclass
class DescriptorChain:
    """A request popped from the available ring.

    Attributes:
        head_index: the descriptor index to hand back to :meth:`Queue.add_used`.
        descriptors: the buffers in order, indirect tables already expanded; each one
            lies inside guest RAM unless its ``in_ram`` is False (then ``error`` is set).
        error: why the chain is malformed, or None. When set, ``descriptors`` holds what
            could be walked; ``structural`` tells whether the chain's end is unknown.
        structural: the walk stopped early (loop, bad next, bad indirect table) and the
            last descriptor is not necessarily the driver's last one.
    """

    head_index: int
    descriptors: list[Descriptor] = field(default_factory=list)
    error: str | None = None
    structural: bool = False

    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write_only]

    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write_only]


class Queue:
    """Device side of one split virtqueue.

    Args:
        max_size: the device's QueueNumMax for this queue (a power of two).
    """

    def __init__(self, max_size: int):
        if not is_valid_queue_size(max_size, MAX_QUEUE_SIZE):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (§2.4): nothing configured, not ready."""
        self.size = self.max_size  # §4.2.2: QueueNum "defaults" to the maximum
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False  # VIRTIO_RING_F_EVENT_IDX negotiated
        self.indirect = False  # VIRTIO_RING_F_INDIRECT_DESC negotiated
        self.next_avail = 0  # our shadow of the last avail idx consumed (free-running u16)
        self.next_used = 0  # the used idx we will publish next
        self.signalled_used: int | None = None  # used idx at the last notification
        self.mem: GuestMemory | None = None

    # -- setup ------------------------------------------------------------------------
    def check_layout(self, mem: GuestMemory) -> str | None:
        """Why this queue cannot be made ready, or None when it can (§2.7, §4.2.3.2)."""
        if not is_valid_queue_size(self.size, self.max_size):
            return f"queue size {self.size} is not a power of two in 1..{self.max_size}"
        for name, addr, align, length in (
                ("descriptor table", self.desc_table, DESC_ALIGN, desc_table_size(self.size)),
                ("available ring", self.avail_ring, AVAIL_ALIGN, avail_ring_size(self.size)),
                ("used ring", self.used_ring, USED_ALIGN, used_ring_size(self.size))):
            if addr % align:  # §2.7 "Virtqueue Part Alignment"
                return f"{name} at {addr:#x} is not {align}-byte aligned"
            if addr + length > _U64_LIMIT or not mem.contains(addr, length):
                return f"{name} {addr:#x}+{length:#x} is outside guest RAM"
        return None

    def activate(self, mem: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Start using a ready queue (on DRIVER_OK), with the negotiated ring features."""
        self.mem = mem
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = 0
        self.next_used = 0
        self.signalled_used = None

    # -- ring access --------------------------------------------------------------------
    # The 16-bit fields the driver and the device both watch while the other side may
    # be writing them (flags, idx, used_event, avail_event) are loaded and stored as one
    # aligned 16-bit access each, through GuestMemory.host_u16: a byte-wise access could
    # see, or show, a value that was never there (half old, half new; or the zero that
    # struct.pack_into writes before the value). The rings' alignment (check_layout)
    # makes every such field 2-byte aligned.
    def _word(self, gpa: int) -> int:
        """Index in ``mem.host_u16`` of the ring field at ``gpa`` (checked in RAM)."""
        host = self.mem.translate(gpa, 2)
        if host < 0 or host & 1:
            raise QueueError(f"ring field at {gpa:#x} is outside guest RAM or unaligned")
        return host >> 1

    def _avail_idx(self) -> int:
        return self.mem.host_u16[self._word(self.avail_ring + 2)]

    def _avail_flags(self) -> int:
        return self.mem.host_u16[self._word(self.avail_ring)]

    def _used_event(self) -> int:
        return self.mem.host_u16[self._word(self.avail_ring + 4 + 2 * self.size)]

    def _set_avail_event(self, value: int) -> None:
        self.mem.host_u16[self._word(self.used_ring + 4 + USED_ELEM_SIZE * self.size)] = \
            value & 0xFFFF

    def pending(self) -> int:
        """Available chains not yet popped.

        Raises:
            QueueError: the driver's avail idx is more than the queue size ahead of the
                last index the device consumed (§2.7.6: the driver cannot offer more
                buffers than there are descriptors).
        """
        n = (self._avail_idx() - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"avail idx is {n} entries ahead of the device "
                             f"(queue size {self.size})")
        return n

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None when the ring is empty.

        The avail idx is read before the ring entry it covers (§2.7.13.3: the driver
        writes the ring entry, a barrier, then idx; Python reads are not reordered).

        Raises:
            QueueError: the ring is broken (run-ahead idx, head index out of range).
        """
        if not self.ready or self.mem is None:
            return None
        if self.pending() == 0:
            if self.event_idx:
                # §2.7.10: tell the driver which avail idx to notify us at next.
                self._set_avail_event(self.next_avail)
            return None
        slot = self.next_avail % self.size
        head = self.mem.read_int(self.avail_ring + 4 + 2 * slot, 2)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:
            self._set_avail_event(self.next_avail)
        if head >= self.size:  # §2.7.6: ring entries are descriptor-table indexes
            raise QueueError(f"avail ring entry {slot} names descriptor {head} "
                             f"(queue size {self.size})")
        chain = DescriptorChain(head)
        self._walk(chain)
        if chain.error:
            log.debug("virtqueue: bad descriptor chain at head %d: %s", head, chain.error)
        return chain

    def _read_desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.mem.view(table + DESC_SIZE * index, DESC_SIZE))

    def _fail(self, chain: DescriptorChain, why: str, structural: bool = True) -> None:
        if chain.error is None:
            chain.error = why
        chain.structural = chain.structural or structural

    def _walk(self, chain: DescriptorChain) -> None:
        """Follow the chain from ``chain.head_index``, expanding one indirect table."""
        table, count, index = self.desc_table, self.size, chain.head_index
        ttl = self.size  # §2.7.5.2: a chain is never longer than the queue size
        in_indirect = False
        while True:
            if ttl == 0:
                return self._fail(chain, "descriptor chain longer than the queue (a loop?)")
            ttl -= 1
            addr, length, flags, nxt = self._read_desc(table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:  # §2.7.5.3.1 only if negotiated
                    return self._fail(chain, "indirect descriptor without INDIRECT_DESC")
                if in_indirect:  # §2.7.5.3.1: no indirect table inside an indirect table
                    return self._fail(chain, "nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:  # §2.7.5.3.1: INDIRECT and NEXT exclusive
                    return self._fail(chain, "indirect descriptor with NEXT set")
                # §2.7.5.3: the table is len/16 descriptors; the write flag of the
                # descriptor naming it is ignored (§2.7.5.3.2).
                if length == 0 or length % DESC_SIZE:
                    return self._fail(chain, f"indirect table length {length} is not a "
                                             f"nonzero multiple of {DESC_SIZE}")
                n = length // DESC_SIZE
                if n > self.max_size:  # bounded like a direct chain (see seg_max)
                    return self._fail(chain, f"indirect table of {n} descriptors exceeds "
                                             f"{self.max_size}")
                if addr + length > _U64_LIMIT or not self.mem.contains(addr, length):
                    return self._fail(chain, f"indirect table {addr:#x}+{length:#x} is "
                                             "outside guest RAM")
                table, count, index, ttl, in_indirect = addr, n, 0, n, True
                continue
            write_only = bool(flags & VIRTQ_DESC_F_WRITE)
            in_ram = True
            if addr + length > _U64_LIMIT:  # §2.7.5: addr/len describe a buffer in memory
                in_ram = False
                self._fail(chain, f"descriptor {addr:#x}+{length:#x} overflows", False)
            elif not self.mem.contains(addr, length):
                in_ram = False
                self._fail(chain, f"descriptor {addr:#x}+{length:#x} is outside guest RAM",
                           False)
            chain.descriptors.append(Descriptor(addr, length, write_only, in_ram))
            if not flags & VIRTQ_DESC_F_NEXT:
                return None
            if nxt >= count:
                return self._fail(chain, f"next index {nxt} beyond the table of {count}")
            index = nxt

    def add_used(self, head_index: int, length: int) -> None:
        """Return a completed chain to the driver (§2.7.8.2).

        The element is written before the used idx, so the driver never sees an index
        covering an element it cannot read yet (§2.7.13.3 device side).

        Args:
            head_index: ``DescriptorChain.head_index`` of the chain.
            length: bytes the device wrote into the chain's device-writable buffers.
        """
        if self.mem is None:
            return
        slot = self.next_used % self.size
        elem = self.used_ring + 4 + USED_ELEM_SIZE * slot
        # The element is not the driver's until the idx store below publishes it.
        self.mem.view(elem, USED_ELEM_SIZE)[:] = struct.pack("<II", head_index, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        self.mem.host_u16[self._word(self.used_ring + 2)] = self.next_used

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (§2.7.7.2, §2.7.10).

        With VIRTIO_F_EVENT_IDX the driver's used_event says at which used idx it wants
        to hear from us; without it, VIRTQ_AVAIL_F_NO_INTERRUPT is a hint we honour.
        """
        if self.mem is None:
            return False
        new = self.next_used
        if self.event_idx:
            # §2.7.7.2: the device MUST ignore NO_INTERRUPT when EVENT_IDX is negotiated.
            old, self.signalled_used = self.signalled_used, new
            if old is None:
                return True
            event = self._used_event()
            # vring_need_event(): did the used idx pass used_event since the last time?
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
