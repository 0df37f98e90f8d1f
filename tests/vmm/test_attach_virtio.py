"""Machine.attach_virtio: any virtio device model goes on the machine through one call,
with its window, IRQ and command-line entry taken from vmm/arch/x86_64/layout.py."""

from __future__ import annotations

import os
import threading

import pytest

from tests.conftest import requires_kvm
from vmm.arch.x86_64 import layout
from vmm.config import DiskConfig, MachineConfig
from vmm.devices.virtio import mmio as M
from vmm.kvm import ioctls as K
from vmm.machine import Machine, MachineError

pytestmark = requires_kvm


class FakeDevice:
    """The least a virtio device model is: an ID, features, queues, config space."""

    device_id = 0x7F
    features = 1 << M.VIRTIO_F_VERSION_1
    queue_max_sizes = (8, 8)

    def __init__(self):
        self.processed: list[int] = []
        self.served = threading.Event()
        self.closed = False

    def read_config(self, offset, size):
        return 0xAB if offset == 0 and size == 1 else 0

    def write_config(self, offset, size, value):
        pass

    def activate(self, queues, mem, signal_used):
        self.queues = queues

    def process_queue(self, index):
        self.processed.append(index)
        self.served.set()

    def reset(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def machine(tiny, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    cfg = MachineConfig(kernel=tiny("hello"), mem_size=64 << 20, disks=[DiskConfig(disk)])
    with Machine(cfg) as m:
        yield m


def reg_write(m, base, offset, value):
    m.mmio.write(base + offset, 4, value)


def drive_to_driver_ok(m, base, queues):
    """The driver's side of §3.1.1 over the MMIO bus, with each queue set up in RAM."""
    reg_write(m, base, M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE)
    reg_write(m, base, M.STATUS_OFFSET, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER)
    reg_write(m, base, M.DRIVER_FEATURES_SEL_OFFSET, 1)
    reg_write(m, base, M.DRIVER_FEATURES_OFFSET, 1 << (M.VIRTIO_F_VERSION_1 - 32))
    status = M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER | M.STATUS_FEATURES_OK
    reg_write(m, base, M.STATUS_OFFSET, status)
    for q in range(queues):
        ring = 0x200000 + q * 0x10000
        reg_write(m, base, M.QUEUE_SEL_OFFSET, q)
        reg_write(m, base, M.QUEUE_NUM_OFFSET, 8)
        reg_write(m, base, M.QUEUE_DESC_LOW_OFFSET, ring)
        reg_write(m, base, M.QUEUE_DRIVER_LOW_OFFSET, ring + 0x1000)
        reg_write(m, base, M.QUEUE_DEVICE_LOW_OFFSET, ring + 0x2000)
        reg_write(m, base, M.QUEUE_READY_OFFSET, 1)
    reg_write(m, base, M.STATUS_OFFSET, status | M.STATUS_DRIVER_OK)
    assert m.mmio.read(base + M.STATUS_OFFSET, 4) == status | M.STATUS_DRIVER_OK


def test_second_device_gets_the_next_window_irq_and_cmdline(machine, monkeypatch):
    m = machine
    assert [s.name for s in m.virtio] == ["virtio-blk0"]
    assert m.virtio[0].base == layout.VIRTIO_MMIO_START
    assert m.virtio[0].irq == layout.VIRTIO_IRQ_BASE

    eventfds = []
    real_add = m.io.add
    monkeypatch.setattr(m.io, "add", lambda h: eventfds.append(real_add(h)) or eventfds[-1])
    fake = FakeDevice()
    slot = m.attach_virtio(fake, "fake0")

    base = layout.VIRTIO_MMIO_START + layout.VIRTIO_MMIO_SIZE
    irq = layout.VIRTIO_IRQ_BASE + 1
    assert (slot.name, slot.device, slot.base, slot.irq) == ("fake0", fake, base, irq)
    assert m.virtio[-1] is slot
    assert m.virtio_cmdline[-1] == M.kernel_cmdline_arg(base, irq, layout.VIRTIO_MMIO_SIZE)
    assert m.virtio_cmdline[-1] == f"virtio_mmio.device=4K@{base:#x}:{irq}"
    # The window is on the MMIO bus behind a transport.
    assert m.mmio.read(base + M.MAGIC_VALUE_OFFSET, 4) == M.MAGIC_VALUE
    assert m.mmio.read(base + M.DEVICE_ID_OFFSET, 4) == FakeDevice.device_id
    assert m.mmio.read(base + M.CONFIG_OFFSET, 1) == 0xAB
    assert m.mmio.read(base + layout.VIRTIO_MMIO_SIZE + M.MAGIC_VALUE_OFFSET, 4) == 0xFFFFFFFF

    # One ioeventfd per queue (when KVM has them), each notifying its own queue on the
    # I/O thread.
    if not m.kvm.check_extension(K.KVM_CAP_IOEVENTFD):
        pytest.skip("no ioeventfd on this host")
    assert len(eventfds) == len(FakeDevice.queue_max_sizes)
    drive_to_driver_ok(m, base, len(FakeDevice.queue_max_sizes))
    m.io.start()
    os.eventfd_write(eventfds[1], 1)
    assert fake.served.wait(5)
    assert fake.processed == [1]


def test_the_machine_closes_attached_devices(tiny):
    m = Machine(MachineConfig(kernel=tiny("hello"), mem_size=64 << 20))
    fake = FakeDevice()
    with m:
        assert m.attach_virtio(fake, "fake0").base == layout.VIRTIO_MMIO_START
    assert fake.closed


def test_at_most_virtio_max_devices(tiny):
    with Machine(MachineConfig(kernel=tiny("hello"), mem_size=64 << 20)) as m:
        for i in range(layout.VIRTIO_MAX_DEVICES):
            slot = m.attach_virtio(FakeDevice(), f"fake{i}")
        assert slot.irq == layout.VIRTIO_IRQ_BASE + layout.VIRTIO_MAX_DEVICES - 1 \
            <= layout.VIRTIO_IRQ_LAST
        assert slot.base + layout.VIRTIO_MMIO_SIZE <= layout.TEST_MMIO_START
        with pytest.raises(MachineError, match="at most"):
            m.attach_virtio(FakeDevice(), "one-too-many")
