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

Snapshot state (vm-virtio's ``QueueState``): :meth:`Queue.save` hands out the queue's
configuration and ring position as plain data -- ``size``, ``ready``, ``desc_table``,
``avail_ring``, ``used_ring``, ``next_avail``, ``next_used``, ``signalled_used``.
Whether the queue is activated and with which ring features (EVENT_IDX, INDIRECT_DESC)
is not in it: the transport derives that from its own state (DRIVER_OK, the acked
features) and hands it to :meth:`Queue.restore`, which checks the state the way
QueueReady and activation do and rebuilds the queue *without* resetting its indexes.
The transport keeps the version (``"v"``) of the state it nests these in.

A :class:`Queue` is not thread-safe by itself: the transport guarantees that only one
thread at a time pops from or adds to a given queue (see mmio.py, "Locking").
"""

from __future__ import annotations

import struct
from collections import namedtuple

from vmm.devices.state import U16_MAX, U32_MAX, U64_MAX, DeviceStateError, fields, flag, uint
from vmm.log import get_logger
from vmm.memory import GuestMemory, memory_barrier

log = get_logger(__name__)


class QueueError(Exception):
    """The driver broke the virtqueue (the device must be reset to recover)."""


class QueueStateError(DeviceStateError):
    """A saved queue state that cannot be restored (one line)."""


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
_USED_ELEM = struct.Struct("<II")
_U64_LIMIT = 1 << 64

#: The keys of Queue.save()'s state.
QUEUE_STATE_KEYS = ("size", "ready", "desc_table", "avail_ring", "used_ring", "next_avail",
                    "next_used", "signalled_used")


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


class Descriptor(namedtuple("Descriptor", "addr len write_only in_ram host")):
    """One buffer of a chain: ``len`` bytes at guest address ``addr``.

    ``in_ram`` is False for a descriptor that points outside guest RAM (or whose
    addr+len overflows 64 bits); such a buffer must never be accessed, it is kept only
    so the device knows where the chain ends. ``host`` is where an in-RAM buffer starts
    in ``GuestMemory.host_view`` (the walk has checked the whole buffer), -1 otherwise.

    A tuple rather than a class: a request has a few of these, made on every request.
    """

    __slots__ = ()


#: Makes a Descriptor without the namedtuple's Python-level __new__ (the walk's hot
#: path): ``_new_descriptor(Descriptor, (addr, len, write_only, in_ram, host))``.
_new_descriptor = tuple.__new__


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

    __slots__ = ("head_index", "descriptors", "error", "structural")

    def __init__(self, head_index: int):
        self.head_index = head_index
        self.descriptors: list[Descriptor] = []
        self.error: str | None = None
        self.structural = False

    def __repr__(self) -> str:
        return (f"DescriptorChain(head_index={self.head_index}, descriptors="
                f"{self.descriptors!r}, error={self.error!r}, structural={self.structural})")

    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write_only]

    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write_only]


def _ring_field(name: str, doc: str) -> property:
    """A field the ring translation depends on; setting it drops the cached translation
    (Queue._translate). The hot paths read the ``_name`` attribute behind it."""
    attr = "_" + name

    def get(self: "Queue"):
        return getattr(self, attr)

    def set_(self: "Queue", value) -> None:
        setattr(self, attr, value)
        self._layout = None

    return property(get, set_, doc=doc)


class Queue:
    """Device side of one split virtqueue.

    Args:
        max_size: the device's QueueNumMax for this queue (a power of two).
    """

    size = _ring_field("size", "QueueNum: entries in each ring (§2.7).")
    desc_table = _ring_field("desc_table", "Guest address of the descriptor table.")
    avail_ring = _ring_field("avail_ring", "Guest address of the available ring.")
    used_ring = _ring_field("used_ring", "Guest address of the used ring.")
    mem = _ring_field("mem", "The guest RAM the rings are in (set by activate()).")

    def __init__(self, max_size: int):
        if not is_valid_queue_size(max_size, MAX_QUEUE_SIZE):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self._layout: tuple | None = None
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
        self._layout = None

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
        self._start(mem, event_idx, indirect, 0, 0, None)

    def _start(self, mem: GuestMemory, event_idx: bool, indirect: bool, next_avail: int,
               next_used: int, signalled_used: int | None) -> None:
        self.mem = mem
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = next_avail
        self.next_used = next_used
        self.signalled_used = signalled_used
        self._layout = None

    # -- snapshot state (see the module docstring) ----------------------------------------
    def save(self) -> dict:
        """The queue's configuration and ring position as plain data (QueueState)."""
        return {"size": self._size, "ready": self.ready, "desc_table": self._desc_table,
                "avail_ring": self._avail_ring, "used_ring": self._used_ring,
                "next_avail": self.next_avail, "next_used": self.next_used,
                "signalled_used": self.signalled_used}

    def check_state(self, state: dict, mem: GuestMemory, *, activated: bool,
                    what: str = "virtqueue") -> None:
        """Check ``state`` (from :meth:`save`) for this queue without changing anything.

        Args:
            mem: the guest RAM the rings must lie in.
            activated: whether the queue is to be restored activated (DRIVER_OK was set
                while it was ready); if not, its ring indexes must be the reset ones.
        Raises:
            QueueStateError: a value of the wrong type or range, a ready queue whose
                size or rings QueueReady would refuse (§2.7, §4.2.3.2), indexes further
                apart than the queue size (§2.7.6).
        """
        try:
            fields(state, what, QUEUE_STATE_KEYS, version=None)
            ready = flag(state, "ready", what)
            # QueueNum holds whatever the driver wrote until QueueReady checks it.
            size = uint(state, "size", what, U32_MAX)
            addrs = [uint(state, k, what, U64_MAX)
                     for k in ("desc_table", "avail_ring", "used_ring")]
            next_avail = uint(state, "next_avail", what, U16_MAX)
            next_used = uint(state, "next_used", what, U16_MAX)
            signalled = state["signalled_used"]
            if signalled is not None:
                uint(state, "signalled_used", what, U16_MAX)
        except DeviceStateError as e:
            raise QueueStateError(str(e)) from None
        if activated and not ready:
            raise QueueStateError(f"{what} state: an activated queue that is not ready")
        if ready:
            probe = Queue(self.max_size)
            probe.size, (probe.desc_table, probe.avail_ring, probe.used_ring) = size, addrs
            why = probe.check_layout(mem)  # what QueueReady checks (§2.7, §4.2.3.2)
            if why:
                raise QueueStateError(f"{what} state: {why}")
        if not activated:
            if next_avail or next_used or signalled is not None:
                raise QueueStateError(f"{what} state: ring indexes of a queue that was "
                                      "never activated are not the reset ones")
        elif (next_avail - next_used) & 0xFFFF > size:
            # §2.7.6: at most queue-size buffers are ever outstanding.
            raise QueueStateError(f"{what} state: next_avail {next_avail} is more than "
                                  f"the queue size {size} ahead of next_used {next_used}")

    def restore(self, state: dict, mem: GuestMemory, *, activated: bool,
                event_idx: bool = False, indirect: bool = False,
                what: str = "virtqueue") -> None:
        """Put this queue into ``state`` (from :meth:`save`), activated on ``mem`` with
        the given ring features when ``activated``; the ring indexes are the saved
        ones, not reset as :meth:`activate` does.

        Raises:
            QueueStateError: see :meth:`check_state`; nothing is changed.
        """
        self.check_state(state, mem, activated=activated, what=what)
        self.reset()
        self.size, self.ready = state["size"], state["ready"]
        self.desc_table, self.avail_ring = state["desc_table"], state["avail_ring"]
        self.used_ring = state["used_ring"]
        if activated:
            self._start(mem, event_idx, indirect, state["next_avail"], state["next_used"],
                        state["signalled_used"])

    def _translate(self) -> tuple:
        """Translate the three ring areas once: ``(words, view, spans, desc, avail,
        used)``: ``view`` is the whole of guest RAM (GuestMemory.host_view), ``words`` the
        same as 16-bit words (GuestMemory.host_u16), ``spans`` GuestMemory.spans, and the
        last three the areas' offsets in ``view`` (``offset >> 1`` indexes ``words``).

        Cached until a ring field or the memory changes; every later ring access
        indexes ``view`` or ``words`` at these offsets without a region search.

        Raises:
            QueueError: an area is not inside guest RAM or not aligned (check_layout()
                refuses such a queue before it is made ready, so only a device
                bypassing it sees this).
        """
        mem = self.mem
        size = self._size
        offsets = []
        for name, addr, align, length in (
                ("descriptor table", self._desc_table, DESC_ALIGN, desc_table_size(size)),
                ("available ring", self._avail_ring, AVAIL_ALIGN, avail_ring_size(size)),
                ("used ring", self._used_ring, USED_ALIGN, used_ring_size(size))):
            host = mem.translate(addr, length)
            if host < 0:
                raise QueueError(f"{name} {addr:#x}+{length:#x} is outside guest RAM")
            if host % align:  # regions start 2 MiB-aligned: same as addr % align
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            offsets.append(host)
        self._layout = (mem.host_u16, mem.host_view, mem.spans, *offsets)
        return self._layout

    # -- ring access --------------------------------------------------------------------
    # Every offset below is inside an area _translate() checked: the avail ring holds
    # flags, idx, ring[size] and used_event; the used ring flags, idx, the elements and
    # avail_event (§2.7.6, §2.7.8). The 16-bit fields that the driver writes while we
    # read them, or reads while we write them, go through ``words`` (GuestMemory.host_u16):
    # one aligned 16-bit access each. A byte-wise access could see, or show, a value that
    # was never there: half old and half new (int.from_bytes), or the zero that
    # struct.pack_into stores before the value — a polling driver that read such a
    # used idx took it for 65533 new completions.
    def _avail_idx(self) -> int:
        words, _, _, _, avail, _ = self._layout or self._translate()
        return words[(avail >> 1) + 1]

    def _avail_flags(self) -> int:
        words, _, _, _, avail, _ = self._layout or self._translate()
        return words[avail >> 1]

    def _used_event(self) -> int:
        words, _, _, _, avail, _ = self._layout or self._translate()
        return words[(avail >> 1) + 2 + self._size]

    def _set_avail_event(self, value: int) -> None:
        words, _, _, _, _, used = self._layout or self._translate()
        words[(used >> 1) + 2 + (USED_ELEM_SIZE >> 1) * self._size] = value & 0xFFFF

    def pending(self) -> int:
        """Available chains not yet popped.

        Raises:
            QueueError: the driver's avail idx is more than the queue size ahead of the
                last index the device consumed (§2.7.6: the driver cannot offer more
                buffers than there are descriptors).
        """
        n = (self._avail_idx() - self.next_avail) & 0xFFFF
        if n > self._size:
            raise QueueError(f"avail idx is {n} entries ahead of the device "
                             f"(queue size {self._size})")
        return n

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None when the ring is empty.

        The avail idx is read before the ring entry it covers (§2.7.13.3: the driver
        writes the ring entry, a barrier, then idx; Python reads are not reordered).

        Raises:
            QueueError: the ring is broken (run-ahead idx, head index out of range).
        """
        if not self.ready or self._mem is None:
            return None
        words, view, spans, table, avail, _ = self._layout or self._translate()
        avail >>= 1  # as an index in words
        size = self._size
        next_avail = self.next_avail
        pending = (words[avail + 1] - next_avail) & 0xFFFF
        if pending == 0 and self.event_idx:
            # §2.7.10: tell the driver which avail idx to notify us at next, then look
            # again: a buffer it published before our store was visible may have gone
            # unnotified (it read the old avail_event). The barrier keeps the re-read
            # from passing the store.
            self._set_avail_event(next_avail)
            memory_barrier()
            pending = (words[avail + 1] - next_avail) & 0xFFFF
        if pending > size:  # §2.7.6: at most queue-size buffers can be offered
            raise QueueError(f"avail idx is {pending} entries ahead of the device "
                             f"(queue size {size})")
        if pending == 0:
            return None
        slot = next_avail % size
        head = words[avail + 2 + slot]
        self.next_avail = next_avail = (next_avail + 1) & 0xFFFF
        if self.event_idx:
            self._set_avail_event(next_avail)
        if head >= size:  # §2.7.6: ring entries are descriptor-table indexes
            raise QueueError(f"avail ring entry {slot} names descriptor {head} "
                             f"(queue size {size})")
        chain = DescriptorChain(head)
        self._walk(chain, view, spans, table)
        if chain.error:
            log.debug("virtqueue: bad descriptor chain at head %d: %s", head, chain.error)
        return chain

    def _fail(self, chain: DescriptorChain, why: str, structural: bool = True) -> None:
        if chain.error is None:
            chain.error = why
        chain.structural = chain.structural or structural

    def _walk(self, chain: DescriptorChain, view: memoryview,
              spans: tuple[tuple[int, int, int], ...], table: int) -> None:
        """Follow the chain from ``chain.head_index``, expanding one indirect table.

        ``view``, ``spans`` and ``table`` come from :meth:`_translate`. ``table`` is the
        host offset (in ``view``) of the table being walked: the queue's own, or an
        indirect one once checked to lie in RAM; ``index`` is always below its ``count``
        entries, so each 16-byte read stays inside that table.
        """
        count = ttl = self._size  # §2.7.5.2: a chain is never longer than the queue size
        index = chain.head_index
        in_indirect = False
        append = chain.descriptors.append
        unpack = _DESC.unpack_from
        while True:
            if ttl == 0:
                return self._fail(chain, "descriptor chain longer than the queue (a loop?)")
            ttl -= 1
            addr, length, flags, nxt = unpack(view, table + DESC_SIZE * index)
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
                host = self.mem.translate(addr, length)
                if addr + length > _U64_LIMIT or host < 0:
                    return self._fail(chain, f"indirect table {addr:#x}+{length:#x} is "
                                             "outside guest RAM")
                table, count, index, ttl, in_indirect = host, n, 0, n, True
                continue
            # §2.7.5: addr/len describe a buffer in guest memory; all of it must be RAM.
            end = addr + length
            for start, stop, base in spans:
                if start <= addr and end <= stop:
                    append(_new_descriptor(Descriptor, (
                        addr, length, bool(flags & VIRTQ_DESC_F_WRITE), True,
                        base + (addr - start))))
                    break
            else:
                if end > _U64_LIMIT:
                    self._fail(chain, f"descriptor {addr:#x}+{length:#x} overflows", False)
                else:
                    self._fail(chain, f"descriptor {addr:#x}+{length:#x} is outside guest "
                                      "RAM", False)
                append(_new_descriptor(Descriptor, (
                    addr, length, bool(flags & VIRTQ_DESC_F_WRITE), False, -1)))
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
        if self._mem is None:
            return
        words, view, _, _, _, used = self._layout or self._translate()
        next_used = self.next_used
        # The element is not the driver's until the idx store below publishes it.
        _USED_ELEM.pack_into(view, used + 4 + USED_ELEM_SIZE * (next_used % self._size),
                             head_index, length)
        self.next_used = next_used = (next_used + 1) & 0xFFFF
        words[(used >> 1) + 1] = next_used

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (§2.7.7.2, §2.7.10).

        With VIRTIO_F_EVENT_IDX the driver's used_event says at which used idx it wants
        to hear from us; without it, VIRTQ_AVAIL_F_NO_INTERRUPT is a hint we honour.
        """
        if self._mem is None:
            return False
        new = self.next_used
        if self.event_idx:
            # §2.7.7.2: the device MUST ignore NO_INTERRUPT when EVENT_IDX is negotiated.
            old, self.signalled_used = self.signalled_used, new
            if old is None:
                return True
            # Our used idx store (add_used) must be visible before we read used_event:
            # the driver stores used_event, then re-reads the used idx (§2.7.10).
            memory_barrier()
            event = self._used_event()
            # vring_need_event(): did the used idx pass used_event since the last time?
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._avail_flags() & VIRTQ_AVAIL_F_NO_INTERRUPT
