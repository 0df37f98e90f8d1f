"""virtio-mmio transport (vmm/devices/virtio/mmio.py), driven through its registers.

``MmioDriver`` is a tiny virtio-mmio driver written from §3.1.1 and §4.2.3: it resets,
negotiates features, sets up queue 0 and sets DRIVER_OK. test_virtio_blk.py uses it.
"""

from __future__ import annotations

import threading

import pytest

from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.queue import QueueError
from vmm.memory import GuestMemory

try:
    from .test_virtio_queue import AVAIL_ADDR, DESC_ADDR, MEM_SIZE, USED_ADDR, Rings
except ImportError:  # tests/unit is not a package
    from test_virtio_queue import AVAIL_ADDR, DESC_ADDR, MEM_SIZE, USED_ADDR, Rings

VERSION_1 = 1 << 32
INDIRECT = 1 << 28
EVENT_IDX = 1 << 29


class MmioDriver:
    """Drives a VirtioMmioTransport the way Linux's virtio_mmio.c does."""

    def __init__(self, transport: M.VirtioMmioTransport, mem: GuestMemory):
        self.t, self.mem = transport, mem
        self.rings: Rings | None = None

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    def device_features(self) -> int:
        self.w(M.DEVICE_FEATURES_SEL_OFFSET, 0)
        lo = self.r(M.DEVICE_FEATURES_OFFSET)
        self.w(M.DEVICE_FEATURES_SEL_OFFSET, 1)
        return lo | self.r(M.DEVICE_FEATURES_OFFSET) << 32

    def set_features(self, features: int) -> None:
        for sel in (0, 1):
            self.w(M.DRIVER_FEATURES_SEL_OFFSET, sel)
            self.w(M.DRIVER_FEATURES_OFFSET, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; whether it was accepted."""
        self.w(M.STATUS_OFFSET, 0)
        self.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE)
        self.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER)
        offered = self.device_features()
        self.set_features(offered if features is None else features)
        self.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER | M.STATUS_FEATURES_OK)
        return bool(self.r(M.STATUS_OFFSET) & M.STATUS_FEATURES_OK)

    def setup_queue(self, index: int = 0, size: int = 16, desc: int = DESC_ADDR,
                    avail: int = AVAIL_ADDR, used: int = USED_ADDR) -> bool:
        self.w(M.QUEUE_SEL_OFFSET, index)
        if self.r(M.QUEUE_READY_OFFSET):
            return False
        self.w(M.QUEUE_NUM_OFFSET, size)
        for lo, addr in ((M.QUEUE_DESC_LOW_OFFSET, desc), (M.QUEUE_DRIVER_LOW_OFFSET, avail),
                         (M.QUEUE_DEVICE_LOW_OFFSET, used)):
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(lo + 4, addr >> 32)
        self.w(M.QUEUE_READY_OFFSET, 1)
        if self.r(M.QUEUE_READY_OFFSET) != 1:
            return False
        self.rings = Rings(self.mem, size, desc, avail, used)
        return True

    def driver_ok(self) -> None:
        self.w(M.STATUS_OFFSET, self.r(M.STATUS_OFFSET) | M.STATUS_DRIVER_OK)

    def start(self, features: int | None = None, size: int = 16) -> Rings:
        assert self.negotiate(features)
        assert self.setup_queue(0, size)
        self.driver_ok()
        assert self.r(M.STATUS_OFFSET) & M.STATUS_DRIVER_OK
        return self.rings

    def submit(self, bufs, *, indirect_table: int | None = None) -> int:
        """Publish one chain and notify queue 0; returns the head."""
        r = self.rings
        head = r.indirect(indirect_table, bufs) if indirect_table is not None else r.chain(bufs)
        r.publish(head)
        self.w(M.QUEUE_NOTIFY_OFFSET, 0)
        return head


class FakeDevice:
    """A VirtioDevice that records what the transport asks of it."""

    device_id = 42
    features = VERSION_1 | (1 << 3)
    queue_max_sizes = (64, 16)

    def __init__(self):
        self.config = bytes(range(16))
        self.activated = 0
        self.resets = 0
        self.processed: list[int] = []
        self.config_writes = []
        self.queues = None
        self.signal = None
        self.fail_with: Exception | None = None
        self.block: threading.Event | None = None

    def read_config(self, offset, size):
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset, size, value):
        self.config_writes.append((offset, size, value))

    def activate(self, queues, mem, signal_used):
        self.activated += 1
        self.queues, self.signal = queues, signal_used

    def process_queue(self, index):
        self.processed.append(index)
        if self.block is not None:
            self.block.wait(5)
        if self.fail_with:
            raise self.fail_with
        q = self.queues[index]
        n = 0
        while (c := q.pop()) is not None:
            q.add_used(c.head_index, 0)
            n += 1
        if n:
            self.signal(index)

    def reset(self):
        self.resets += 1


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


@pytest.fixture
def env(mem):
    dev = FakeDevice()
    irqs = []
    t = M.VirtioMmioTransport(dev, mem, lambda: irqs.append(1))
    return t, dev, irqs, MmioDriver(t, mem)


# --- identification ---------------------------------------------------------------------
def test_identification_registers(env):
    t, dev, _, d = env
    assert d.r(M.MAGIC_VALUE_OFFSET) == 0x74726976
    assert d.r(M.VERSION_OFFSET) == 2
    assert d.r(M.DEVICE_ID_OFFSET) == 42
    assert d.r(M.VENDOR_ID_OFFSET).to_bytes(4, "little") == b"PYVM"
    assert d.device_features() == dev.features | INDIRECT | EVENT_IDX
    d.w(M.DEVICE_FEATURES_SEL_OFFSET, 7)
    assert d.r(M.DEVICE_FEATURES_OFFSET) == 0
    assert d.r(M.SHM_LEN_LOW_OFFSET) == 0xFFFFFFFF  # no shared memory regions


def test_kernel_cmdline_arg():
    assert M.kernel_cmdline_arg(0xD0000000, 5) == "virtio_mmio.device=4K@0xd0000000:5"
    assert M.kernel_cmdline_arg(0xD0001000, 6) == "virtio_mmio.device=4K@0xd0001000:6"


@pytest.mark.parametrize("size", [1, 2, 8])
def test_wrong_width_register_access(env, size):
    t, _, _, d = env
    assert t.read(M.MAGIC_VALUE_OFFSET, size) == 0
    t.write(M.STATUS_OFFSET, size, M.STATUS_ACKNOWLEDGE)
    assert d.r(M.STATUS_OFFSET) == 0


def test_unaligned_register_access(env):
    t, *_ = env
    assert t.read(M.MAGIC_VALUE_OFFSET + 2, 4) == 0


def test_unknown_register(env):
    t, _, _, d = env
    assert d.r(0x0E0) == 0
    d.w(0x0E0, 123)  # ignored, no exception
    d.w(M.MAGIC_VALUE_OFFSET, 0)  # read-only
    assert d.r(M.MAGIC_VALUE_OFFSET) == 0x74726976


# --- config space ------------------------------------------------------------------------------
def test_config_space_any_width(env):
    t, dev, _, d = env
    assert t.read(0x100, 1) == 0
    assert t.read(0x102, 2) == 0x0302
    assert t.read(0x104, 4) == 0x07060504
    assert t.read(0x108, 8) == 0x0F0E0D0C0B0A0908
    assert t.read(0x100, 3) == 0  # not a width
    t.write(0x104, 2, 0xBEEF)
    assert dev.config_writes == [(4, 2, 0xBEEF)]


def test_config_change_bumps_generation(env):
    t, _, irqs, d = env
    d.start()
    gen = d.r(M.CONFIG_GENERATION_OFFSET)
    t.config_changed()
    assert d.r(M.CONFIG_GENERATION_OFFSET) == gen + 1
    assert d.r(M.INTERRUPT_STATUS_OFFSET) == M.INT_CONFIG_CHANGE and irqs


# --- status and features (§2.1, §2.2, §3.1.1) -------------------------------------------------
def test_full_handshake(env):
    t, dev, _, d = env
    d.start()
    assert dev.activated == 1
    assert t.driver_features == dev.features | INDIRECT | EVENT_IDX
    assert dev.queues[0].event_idx and dev.queues[0].indirect
    assert d.r(M.STATUS_OFFSET) == 0xF


def test_unoffered_feature_refuses_features_ok(env):
    _, dev, _, d = env
    assert not d.negotiate(dev.features | (1 << 40))
    assert not d.r(M.STATUS_OFFSET) & M.STATUS_FEATURES_OK
    d.driver_ok()  # without FEATURES_OK, DRIVER_OK is refused too
    assert not d.r(M.STATUS_OFFSET) & M.STATUS_DRIVER_OK and dev.activated == 0


def test_version_1_required(env):
    _, dev, _, d = env
    assert not d.negotiate(dev.features & ~VERSION_1)


def test_subset_of_features_accepted(env):
    t, dev, _, d = env
    assert d.negotiate(VERSION_1)
    assert d.setup_queue()
    d.driver_ok()
    assert not dev.queues[0].event_idx and not dev.queues[0].indirect


def test_features_written_in_wrong_state_are_ignored(env):
    t, dev, _, d = env
    d.set_features(VERSION_1)  # before DRIVER
    assert t.driver_features == 0
    d.negotiate(VERSION_1)
    d.set_features(VERSION_1 | INDIRECT)  # after FEATURES_OK
    assert t.driver_features == VERSION_1


def test_status_bits_in_order_only(env):
    _, dev, _, d = env
    d.w(M.STATUS_OFFSET, M.STATUS_DRIVER)  # DRIVER before ACKNOWLEDGE
    assert d.r(M.STATUS_OFFSET) == 0
    d.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE)
    d.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER | M.STATUS_DRIVER_OK)
    assert d.r(M.STATUS_OFFSET) == M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER
    d.w(M.STATUS_OFFSET, M.STATUS_DRIVER)  # clearing a bit: ignored
    assert d.r(M.STATUS_OFFSET) == M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER
    d.w(M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER | M.STATUS_FAILED)
    assert d.r(M.STATUS_OFFSET) & M.STATUS_FAILED
    assert dev.activated == 0


def test_reset_clears_state(env):
    t, dev, irqs, d = env
    rings = d.start()
    rings.publish(rings.chain([(0x100000, 8, True)]))
    d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    assert d.r(M.INTERRUPT_STATUS_OFFSET) == M.INT_USED_BUFFER
    resets = dev.resets
    d.w(M.STATUS_OFFSET, 0)
    assert dev.resets == resets + 1
    assert d.r(M.STATUS_OFFSET) == 0 and d.r(M.INTERRUPT_STATUS_OFFSET) == 0
    assert t.driver_features == 0
    d.w(M.QUEUE_SEL_OFFSET, 0)
    assert d.r(M.QUEUE_READY_OFFSET) == 0
    assert t.queues[0].size == 64 and t.queues[0].desc_table == 0
    # and the device can be brought up again
    d.start()
    assert dev.activated == 2


# --- queues (§4.2.3.2) -------------------------------------------------------------------
def test_queue_num_max(env):
    _, _, _, d = env
    for sel, expect in ((0, 64), (1, 16), (2, 0), (0xFFFFFFFF, 0)):
        d.w(M.QUEUE_SEL_OFFSET, sel)
        assert d.r(M.QUEUE_NUM_MAX_OFFSET) == expect


@pytest.mark.parametrize("size", [0, 3, 24, 128, 0xFFFFFFFF])
def test_bad_queue_size_cannot_be_made_ready(env, size):
    _, _, _, d = env
    assert d.negotiate()
    assert not d.setup_queue(0, size)


@pytest.mark.parametrize("desc,avail,used", [
    (DESC_ADDR + 4, AVAIL_ADDR, USED_ADDR),
    (DESC_ADDR, AVAIL_ADDR + 1, USED_ADDR),
    (DESC_ADDR, AVAIL_ADDR, USED_ADDR + 2),
    (MEM_SIZE, AVAIL_ADDR, USED_ADDR),
    (DESC_ADDR, 1 << 40, USED_ADDR),
])
def test_bad_ring_addresses_cannot_be_made_ready(env, desc, avail, used):
    _, _, _, d = env
    assert d.negotiate()
    assert not d.setup_queue(0, 16, desc, avail, used)


def test_queue_registers_frozen_after_ready_and_driver_ok(env):
    t, _, _, d = env
    d.negotiate()
    d.setup_queue(0, 16)
    d.w(M.QUEUE_NUM_OFFSET, 8)  # ready: ignored
    assert t.queues[0].size == 16
    d.driver_ok()
    d.w(M.QUEUE_SEL_OFFSET, 1)
    d.w(M.QUEUE_NUM_OFFSET, 8)  # after DRIVER_OK: ignored
    assert t.queues[1].size == 16
    d.w(M.QUEUE_SEL_OFFSET, 0)
    d.w(M.QUEUE_READY_OFFSET, 0)
    assert d.r(M.QUEUE_READY_OFFSET) == 1


def test_high_address_halves(env):
    t, _, _, d = env
    d.w(M.QUEUE_SEL_OFFSET, 0)
    d.w(M.QUEUE_DESC_HIGH_OFFSET, 1)
    d.w(M.QUEUE_DESC_LOW_OFFSET, 0x1000)
    assert t.queues[0].desc_table == (1 << 32) | 0x1000
    d.w(M.QUEUE_SEL_OFFSET, 5)  # no such queue: ignored
    d.w(M.QUEUE_DESC_LOW_OFFSET, 0x2000)


# --- notifications and interrupts -----------------------------------------------------
def test_notify_before_driver_ok_is_ignored(env):
    t, dev, _, d = env
    d.negotiate()
    d.setup_queue()
    d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    t.notify(0)
    assert dev.processed == []
    d.driver_ok()
    t.notify(0)
    t.notify(1)  # not ready
    t.notify(7)  # no such queue
    assert dev.processed == [0]


def test_used_buffer_interrupt_and_ack(env):
    t, _, irqs, d = env
    rings = d.start()
    d.submit([(0x100000, 8, True)])
    assert rings.take_used() and irqs == [1]
    assert d.r(M.INTERRUPT_STATUS_OFFSET) == M.INT_USED_BUFFER
    d.w(M.INTERRUPT_ACK_OFFSET, M.INT_USED_BUFFER)
    assert d.r(M.INTERRUPT_STATUS_OFFSET) == 0


def test_no_interrupt_when_driver_suppresses(env):
    t, _, irqs, d = env
    rings = d.start(VERSION_1)
    rings.set_avail_flags(1)
    d.submit([(0x100000, 8, True)])
    assert rings.take_used() and irqs == [] and d.r(M.INTERRUPT_STATUS_OFFSET) == 0


def test_queue_error_sets_needs_reset(env):
    t, dev, irqs, d = env
    rings = d.start()
    rings.set_avail_idx(100)  # run-ahead
    t.notify(0)  # no exception escapes
    st = d.r(M.STATUS_OFFSET)
    assert st & M.STATUS_DEVICE_NEEDS_RESET and st & M.STATUS_DRIVER_OK
    assert d.r(M.INTERRUPT_STATUS_OFFSET) & M.INT_CONFIG_CHANGE and irqs
    dev.processed.clear()
    t.notify(0)  # a broken device serves nothing until reset
    assert dev.processed == []
    d.w(M.STATUS_OFFSET, 0)
    assert d.r(M.STATUS_OFFSET) == 0


def test_device_queue_error_is_contained(env):
    t, dev, _, d = env
    d.start()
    dev.fail_with = QueueError("boom")
    d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    assert d.r(M.STATUS_OFFSET) & M.STATUS_DEVICE_NEEDS_RESET


def test_needs_reset_before_driver_ok_sends_no_interrupt(env):
    t, _, irqs, d = env
    d.negotiate()
    t.set_needs_reset("test")
    assert irqs == [] and d.r(M.STATUS_OFFSET) & M.STATUS_DEVICE_NEEDS_RESET


def test_queue_notify_hook(mem):
    dev = FakeDevice()
    seen = []
    t = M.VirtioMmioTransport(dev, mem, lambda: None, queue_notify=seen.append)
    d = MmioDriver(t, mem)
    d.start()
    d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    assert seen == [0] and dev.processed == []  # handed off, not served on this thread
    t.notify(0)
    assert dev.processed == [0]


def test_register_access_not_blocked_by_io(env):
    """The I/O thread holds only _io_lock while serving: a vCPU reading registers
    (InterruptStatus, config) is not blocked by a slow request."""
    t, dev, _, d = env
    d.start()
    dev.block = threading.Event()
    io = threading.Thread(target=t.notify, args=(0,))
    io.start()
    try:
        for _ in range(100):
            if dev.processed:
                break
            threading.Event().wait(0.01)
        assert dev.processed == [0]
        done = threading.Event()

        def vcpu():
            d.r(M.INTERRUPT_STATUS_OFFSET)
            d.w(M.INTERRUPT_ACK_OFFSET, 1)
            t.read(0x100, 4)
            done.set()

        threading.Thread(target=vcpu).start()
        assert done.wait(2)
    finally:
        dev.block.set()
        io.join(5)
    # and reset waits for the in-flight request
    dev.block = threading.Event()
    io = threading.Thread(target=t.notify, args=(0,))
    io.start()
    for _ in range(100):
        if len(dev.processed) == 2:
            break
        threading.Event().wait(0.01)
    resets = dev.resets
    resetter = threading.Thread(target=d.w, args=(M.STATUS_OFFSET, 0))
    resetter.start()
    resetter.join(0.2)
    assert resetter.is_alive() and dev.resets == resets
    dev.block.set()
    resetter.join(5)
    io.join(5)
    assert dev.resets == resets + 1
