"""Split virtqueue (vmm/devices/virtio/queue.py), driven without a VM.

The helpers here (``Rings``, ``Buffers``) play the driver's part: they lay out the
descriptor table and the rings in a real GuestMemory, the way Linux's virtio_ring does.
test_virtio_mmio.py and test_virtio_blk.py import them.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    QueueError,
    avail_ring_size,
    used_ring_size,
)
from vmm.memory import GuestMemory

MEM_SIZE = 16 << 20
DESC_ADDR = 0x10000
AVAIL_ADDR = 0x20000
USED_ADDR = 0x30000
DATA_ADDR = 0x100000


class Buffers:
    """A bump allocator for request buffers in guest RAM."""

    def __init__(self, mem: GuestMemory, start: int = DATA_ADDR):
        self.mem = mem
        self.next = start

    def alloc(self, size: int, data: bytes | None = None, align: int = 16) -> int:
        addr = self.next
        self.next = (addr + max(size, 1) + align - 1) & ~(align - 1)
        if data is not None:
            self.mem.write(addr, data)
        return addr


class Rings:
    """The driver side of one split virtqueue in guest memory (§2.7)."""

    def __init__(self, mem: GuestMemory, size: int = 16, desc: int = DESC_ADDR,
                 avail: int = AVAIL_ADDR, used: int = USED_ADDR):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = desc, avail, used
        self.next_desc = 0
        self.avail_idx = 0
        self.last_used = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def _alloc_desc(self) -> int:
        i = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.size
        return i

    def chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Write a direct chain of (addr, len, device_writable); returns its head."""
        idx = [self._alloc_desc() for _ in bufs]
        for k, (addr, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.set_desc(idx[k], addr, length, flags, 0 if last else idx[k + 1])
        return idx[0]

    def indirect(self, table: int, bufs: list[tuple[int, int, bool]]) -> int:
        """Write an indirect table at ``table`` and one descriptor naming it."""
        for k, (addr, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.set_desc(k, addr, length, flags, 0 if last else k + 1, table=table)
        head = self._alloc_desc()
        self.set_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(self.avail + 2, 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_int(self.avail + 2, 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_int(self.avail, 2, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_int(self.avail + 4 + 2 * self.size, 2, value)

    def avail_event(self) -> int:
        return self.mem.read_int(self.used + 4 + 8 * self.size, 2)

    def used_idx(self) -> int:
        return self.mem.read_int(self.used + 2, 2)

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements (id, len) published since the last call."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def make_queue(mem: GuestMemory, size: int = 16, max_size: int = 256, *,
               event_idx: bool = False, indirect: bool = True) -> tuple[Queue, Rings]:
    q = Queue(max_size)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = DESC_ADDR, AVAIL_ADDR, USED_ADDR
    assert q.check_layout(mem) is None
    q.ready = True
    q.activate(mem, event_idx=event_idx, indirect=indirect)
    return q, Rings(mem, size)


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


# --- the ordinary path --------------------------------------------------------------------
def test_pop_simple_chain_and_add_used(mem):
    q, r = make_queue(mem)
    assert q.pop() is None
    head = r.chain([(0x100000, 16, False), (0x100100, 512, True), (0x100400, 1, True)])
    r.publish(head)
    c = q.pop()
    assert c.head_index == head and c.error is None
    assert [(d.addr, d.len, d.write_only) for d in c.descriptors] == [
        (0x100000, 16, False), (0x100100, 512, True), (0x100400, 1, True)]
    assert len(c.readable()) == 1 and len(c.writable()) == 2
    assert q.pop() is None
    assert r.used_idx() == 0  # nothing is used until the device says so
    q.add_used(c.head_index, 513)
    assert r.take_used() == [(head, 513)]


def test_indices_wrap_at_16_bits(mem):
    q, r = make_queue(mem, size=4)
    q.next_avail = q.next_used = 0xFFFE
    r.avail_idx = r.last_used = 0xFFFE
    mem.write_int(USED_ADDR + 2, 2, 0xFFFE)
    for _ in range(5):
        head = r.chain([(0x100000, 8, True)])
        r.publish(head)
        c = q.pop()
        assert c is not None and c.error is None
        q.add_used(c.head_index, 8)
        assert r.take_used() == [(head, 8)]
    assert q.next_avail == 3 and r.used_idx() == 3


# --- ring-level errors: QueueError (the transport turns them into NEEDS_RESET) ---------------
def test_avail_idx_run_ahead_is_a_queue_error(mem):
    q, r = make_queue(mem, size=8)
    r.set_avail_idx(9)  # 9 > queue size entries ahead (§2.7.6)
    with pytest.raises(QueueError):
        q.pop()


def test_avail_idx_exactly_queue_size_ahead_is_fine(mem):
    q, r = make_queue(mem, size=4)
    for _ in range(4):
        r.publish(r.chain([(0x100000, 8, True)]))
    assert sum(1 for _ in iter(q.pop, None)) == 4


def test_head_index_outside_table_is_a_queue_error(mem):
    q, r = make_queue(mem, size=8)
    r.publish(8)
    with pytest.raises(QueueError):
        q.pop()


# --- chain-level errors: DescriptorChain.error --------------------------------------------
def test_descriptor_loop_is_bounded(mem):
    q, r = make_queue(mem, size=8)
    r.set_desc(0, 0x100000, 8, VIRTQ_DESC_F_NEXT, 1)
    r.set_desc(1, 0x100000, 8, VIRTQ_DESC_F_NEXT, 0)
    r.publish(0)
    c = q.pop()
    assert c.structural and "longer than the queue" in c.error
    assert len(c.descriptors) == 8  # ttl = queue size


def test_self_loop(mem):
    q, r = make_queue(mem, size=16)
    r.set_desc(3, 0x100000, 8, VIRTQ_DESC_F_NEXT, 3)
    r.publish(3)
    c = q.pop()
    assert c.structural and len(c.descriptors) == 16


def test_full_length_chain_is_allowed(mem):
    q, r = make_queue(mem, size=8)
    head = r.chain([(0x100000 + 16 * i, 16, False) for i in range(8)])
    r.publish(head)
    c = q.pop()
    assert c.error is None and len(c.descriptors) == 8


def test_next_beyond_table(mem):
    q, r = make_queue(mem, size=8)
    r.set_desc(0, 0x100000, 8, VIRTQ_DESC_F_NEXT, 8)
    r.publish(0)
    c = q.pop()
    assert c.structural and "next index 8" in c.error


def test_descriptor_outside_ram(mem):
    q, r = make_queue(mem)
    head = r.chain([(0x100000, 16, False), (MEM_SIZE - 8, 16, True), (0x100400, 1, True)])
    r.publish(head)
    c = q.pop()
    assert c.error and not c.structural
    assert [d.in_ram for d in c.descriptors] == [True, False, True]


def test_descriptor_length_overflows_64_bits(mem):
    q, r = make_queue(mem)
    head = r.chain([((1 << 64) - 16, 32, False), (0x100400, 1, True)])
    r.publish(head)
    c = q.pop()
    assert "overflows" in c.error and not c.descriptors[0].in_ram


def test_descriptor_in_mmio_gap_is_outside_ram(mem):
    q, r = make_queue(mem)
    r.publish(r.chain([(0xD000_0000, 0x1000, True)]))
    assert q.pop().error


# --- indirect descriptors (§2.7.5.3) -----------------------------------------------------
def test_indirect_table(mem):
    q, r = make_queue(mem)
    head = r.indirect(0x50000, [(0x100000, 16, False), (0x100100, 512, True),
                                (0x100400, 1, True)])
    r.publish(head)
    c = q.pop()
    assert c.error is None and c.head_index == head
    assert [(d.addr, d.len, d.write_only) for d in c.descriptors] == [
        (0x100000, 16, False), (0x100100, 512, True), (0x100400, 1, True)]


def test_direct_descriptors_then_indirect(mem):
    q, r = make_queue(mem)
    for k, (a, n, w) in enumerate([(0x100100, 512, True), (0x100400, 1, True)]):
        r.set_desc(k, a, n, VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if k == 0 else 0),
                   1, table=0x50000)
    r.set_desc(0, 0x100000, 16, VIRTQ_DESC_F_NEXT, 1)
    r.set_desc(1, 0x50000, 32, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    c = q.pop()
    assert c.error is None and len(c.descriptors) == 3


def test_indirect_without_feature(mem):
    q, r = make_queue(mem, indirect=False)
    r.publish(r.indirect(0x50000, [(0x100000, 16, True)]))
    assert q.pop().structural


def test_nested_indirect(mem):
    q, r = make_queue(mem)
    r.set_desc(0, 0x100000, 16, VIRTQ_DESC_F_NEXT, 1, table=0x50000)
    r.set_desc(1, 0x60000, 16, VIRTQ_DESC_F_INDIRECT, 0, table=0x50000)
    r.set_desc(0, 0x100400, 1, VIRTQ_DESC_F_WRITE, 0, table=0x60000)
    r.set_desc(0, 0x50000, 32, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    c = q.pop()
    assert c.structural and "nested" in c.error


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_table_odd_size(mem, length):
    q, r = make_queue(mem)
    r.set_desc(0, 0x50000, length, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    assert q.pop().structural


def test_indirect_table_outside_ram(mem):
    q, r = make_queue(mem)
    r.set_desc(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    assert "outside guest RAM" in q.pop().error


def test_indirect_with_next_flag(mem):
    q, r = make_queue(mem)
    r.set_desc(0, 0x50000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    r.set_desc(0, 0x100000, 16, VIRTQ_DESC_F_WRITE, table=0x50000)
    r.publish(0)
    assert q.pop().structural


def test_indirect_table_too_long(mem):
    q, r = make_queue(mem, max_size=16)
    r.set_desc(0, 0x50000, 17 * 16, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    assert "exceeds" in q.pop().error


def test_loop_inside_indirect_table(mem):
    q, r = make_queue(mem)
    r.set_desc(0, 0x100000, 8, VIRTQ_DESC_F_NEXT, 1, table=0x50000)
    r.set_desc(1, 0x100000, 8, VIRTQ_DESC_F_NEXT, 0, table=0x50000)
    r.set_desc(0, 0x50000, 32, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    c = q.pop()
    assert c.structural and len(c.descriptors) == 2  # ttl = table entries


def test_next_beyond_indirect_table(mem):
    q, r = make_queue(mem)
    r.set_desc(0, 0x100000, 8, VIRTQ_DESC_F_NEXT, 2, table=0x50000)
    r.set_desc(0, 0x50000, 32, VIRTQ_DESC_F_INDIRECT)
    r.publish(0)
    assert "beyond the table of 2" in q.pop().error


# --- layout validation (§2.7 alignment, sizes) -------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 12, 512, 1 << 20])
def test_bad_queue_sizes(mem, size):
    q = Queue(256)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = DESC_ADDR, AVAIL_ADDR, USED_ADDR
    assert "queue size" in q.check_layout(mem)


@pytest.mark.parametrize("field,addr,msg", [
    ("desc_table", DESC_ADDR + 8, "aligned"),
    ("avail_ring", AVAIL_ADDR + 1, "aligned"),
    ("used_ring", USED_ADDR + 2, "aligned"),
    ("desc_table", MEM_SIZE - 16, "outside"),
    ("avail_ring", MEM_SIZE - 2, "outside"),
    ("used_ring", 0xC000_0000, "outside"),
    ("used_ring", (1 << 64) - 4, "outside"),
])
def test_bad_ring_addresses(mem, field, addr, msg):
    q = Queue(256)
    q.size = 16
    q.desc_table, q.avail_ring, q.used_ring = DESC_ADDR, AVAIL_ADDR, USED_ADDR
    setattr(q, field, addr)
    assert msg in q.check_layout(mem)


def test_max_size_must_be_power_of_two():
    with pytest.raises(ValueError):
        Queue(100)


# --- notification suppression (§2.7.7, §2.7.10) --------------------------------------------
def test_no_interrupt_flag(mem):
    q, r = make_queue(mem)
    assert q.needs_notification()
    r.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification()


def test_event_idx(mem):
    q, r = make_queue(mem, event_idx=True)
    r.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    for _ in range(3):
        r.publish(r.chain([(0x100000, 8, True)]))
    r.set_used_event(1)  # "interrupt me when used idx passes 1"
    c = q.pop()
    assert r.avail_event() == 1  # device asks to be notified at the next avail idx
    q.add_used(c.head_index, 0)  # used idx 1
    assert q.needs_notification()  # first time: always
    q.add_used(q.pop().head_index, 0)  # used idx 2: crosses used_event 1
    assert q.needs_notification()
    q.add_used(q.pop().head_index, 0)  # used idx 3: used_event still 1, already signalled
    assert not q.needs_notification()
    assert q.pop() is None and r.avail_event() == 3
    r.set_used_event(3)
    r.publish(r.chain([(0x100000, 8, True)]))
    q.add_used(q.pop().head_index, 0)  # used idx 4 passes 3
    assert q.needs_notification()


def test_event_idx_empty_ring_looks_again_after_setting_avail_event(mem, monkeypatch):
    """A buffer the driver publishes while the device is finding the ring empty (before
    the device's avail_event store is visible, so the driver did not notify) is popped
    by the same pop(): the device sets avail_event, a barrier, then re-reads the idx."""
    from vmm.devices.virtio import queue as queue_mod
    q, r = make_queue(mem, event_idx=True)
    head = r.chain([(0x100000, 8, True)])
    calls = []

    def barrier_while_the_driver_publishes():
        calls.append(r.avail_event())  # the device's store came first
        r.publish(head)

    monkeypatch.setattr(queue_mod, "memory_barrier", barrier_while_the_driver_publishes)
    chain = q.pop()
    assert calls == [0]
    assert chain is not None and chain.head_index == head
    assert r.avail_event() == 1


def test_event_idx_reads_used_event_after_a_barrier(mem, monkeypatch):
    """needs_notification() reads used_event only after a barrier that follows the used
    idx store (the driver stores used_event, then re-reads the used idx: §2.7.10)."""
    from vmm.devices.virtio import queue as queue_mod
    q, r = make_queue(mem, event_idx=True)
    for _ in range(2):
        r.publish(r.chain([(0x100000, 8, True)]))
    q.add_used(q.pop().head_index, 0)
    assert q.needs_notification()  # first time: always
    q.add_used(q.pop().head_index, 0)  # used idx 2; used_event is 0: already passed
    seen = []

    def barrier_while_the_driver_asks():
        seen.append(r.used_idx())
        r.set_used_event(1)  # the driver: "interrupt me when used idx passes 1"

    monkeypatch.setattr(queue_mod, "memory_barrier", barrier_while_the_driver_asks)
    assert q.needs_notification()
    assert seen == [2]


def test_memory_barrier_is_callable_with_and_without_the_shim():
    from vmm import memory
    memory.memory_barrier()
    memory._lock_barrier()


# --- the translated fast path --------------------------------------------------------------
def test_descriptor_host_offsets_index_guest_ram(mem):
    q, r = make_queue(mem)
    mem.write(0x100100, b"payload")
    r.publish(r.chain([(0x100100, 7, False), (0x100400, 1, True)]))
    c = q.pop()
    assert [bytes(mem.host_view[d.host:d.host + d.len]) for d in c.descriptors] == [
        b"payload", mem.read(0x100400, 1)]


def test_ring_above_4g_and_buffers_in_both_regions():
    """Guest RAM split around the MMIO gap: host offsets differ from guest addresses."""
    with GuestMemory(4 << 30) as big:          # MAP_NORESERVE: only touched pages count
        high = big.regions[1].guest_addr
        q = Queue(16)
        q.size = 16
        q.desc_table, q.avail_ring, q.used_ring = high, high + 0x1000, high + 0x2000
        assert q.check_layout(big) is None
        q.ready = True
        q.activate(big, event_idx=False, indirect=True)
        r = Rings(big, 16, high, high + 0x1000, high + 0x2000)
        big.write(high + 0x5000, b"hi")
        big.write(0x5000, b"lo")
        r.publish(r.indirect(high + 0x3000, [(high + 0x5000, 2, False), (0x5000, 2, True)]))
        c = q.pop()
        assert c.error is None
        assert [bytes(big.host_view[d.host:d.host + d.len]) for d in c.descriptors] == [
            b"hi", b"lo"]
        r.publish(r.chain([(big.regions[0].end - 1, 2, True)]))  # spans the MMIO gap
        c = q.pop()
        assert "outside guest RAM" in c.error and c.descriptors[0].host == -1
        q.add_used(c.head_index, 5)
        assert r.take_used() == [(c.head_index, 5)]


def test_ring_fields_changed_after_activation_are_used(mem):
    """The ring translation is cached; setting a ring field drops it."""
    q, r = make_queue(mem)
    r.publish(r.chain([(0x100000, 8, True)]))
    assert q.pop() is not None
    mem.write_int(AVAIL_ADDR + 0x800 + 2, 2, 1)  # another ring, at idx 1: empty now
    q.avail_ring = AVAIL_ADDR + 0x800
    assert q.pop() is None
    q.avail_ring = AVAIL_ADDR
    q.next_avail = 0
    assert q.pop() is not None


def test_rings_outside_ram_without_check_layout_are_a_queue_error(mem):
    q, r = make_queue(mem)
    q.used_ring = MEM_SIZE - 4  # bypassing check_layout(), as no transport does
    with pytest.raises(QueueError):
        q.pop()


def test_unaligned_rings_without_check_layout_are_a_queue_error(mem):
    # The idx fields are accessed as aligned 16-bit words (GuestMemory.host_u16).
    q, r = make_queue(mem)
    q.avail_ring = AVAIL_ADDR + 1  # bypassing check_layout(), as no transport does
    with pytest.raises(QueueError, match="aligned"):
        q.pop()


# --- properties ------------------------------------------------------------------------------
desc_st = st.tuples(
    st.one_of(st.integers(0, MEM_SIZE + 0x1000), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 4096), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 7),
    st.integers(0, 20))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(desc_st, min_size=16, max_size=16),
       table=st.lists(desc_st, min_size=0, max_size=8),
       heads=st.lists(st.integers(0, 17), max_size=20),
       idx=st.integers(0, 0xFFFF), indirect=st.booleans())
def test_random_rings_never_escape(mem, descs, table, heads, idx, indirect):
    """Whatever the driver writes: pop() ends, only QueueError escapes, and every
    descriptor marked in RAM really is inside RAM."""
    q, r = make_queue(mem, size=16, max_size=16, indirect=indirect)
    for i, (a, n, f, nx) in enumerate(descs):
        r.set_desc(i, a, n, f, nx)
    for i, (a, n, f, nx) in enumerate(table):
        r.set_desc(i, a, n, f, nx, table=0x50000)
    for k, h in enumerate(heads):
        mem.write_int(AVAIL_ADDR + 4 + 2 * (k % 16), 2, h)
    r.set_avail_idx(idx)
    before = mem.read(0, DESC_ADDR)  # nothing below the rings is touched
    for _ in range(40):
        try:
            c = q.pop()
        except QueueError:
            break
        if c is None:
            break
        assert len(c.descriptors) <= 32
        for d in c.descriptors:
            if d.in_ram:
                assert mem.contains(d.addr, d.len)
                assert d.host == mem.translate(d.addr, d.len) >= 0
            else:
                assert c.error and d.host == -1
        q.add_used(c.head_index, 0)
    assert mem.read(0, DESC_ADDR) == before


def test_ring_sizes():
    assert avail_ring_size(256) == 518 and used_ring_size(256) == 2054
