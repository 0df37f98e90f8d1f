"""Empty virtio-blk drives and disks inserted into them after the driver negotiated
(vmm/disk/empty.py, VirtioBlk.insert, VirtioMmioTransport.change_device): what lets one
cached snapshot of a booted guest serve runs with any disks (vmm/guest.py).

No VM: the driver side is test_virtio_mmio.MmioDriver over a real GuestMemory."""

from __future__ import annotations

import pytest

from vmm.devices.state import DeviceStateError
from vmm.devices.virtio import blk as B
from vmm.devices.virtio import mmio as M

try:
    from .test_virtio_blk import DISK_SECTORS, IOERR, OK, Env, disk, mem, pattern  # noqa: F401
except ImportError:  # tests/unit is not a package
    from test_virtio_blk import DISK_SECTORS, IOERR, OK, Env, disk, mem, pattern  # noqa: F401

INTERRUPT_STATUS, CONFIG_GENERATION, CAPACITY = 0x60, 0xFC, 0x100
EMPTY_FEATURES = B._BASE_FEATURES


@pytest.fixture
def empty(mem):
    e = Env(None, mem)
    yield e
    e.dev.close()


def test_an_empty_drive_has_no_sectors_and_offers_the_base_features(empty):
    assert empty.dev.empty and empty.t.read(CAPACITY, 8) == 0
    assert empty.dev.features == EMPTY_FEATURES
    assert not empty.dev.features >> B.VIRTIO_BLK_F_RO & 1
    assert empty.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == IOERR
    assert empty.request(B.VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)[0] == IOERR
    assert empty.request(B.VIRTIO_BLK_T_FLUSH)[0] == OK


def test_inserting_a_disk_changes_capacity_and_interrupts_the_driver(empty, disk):
    gen = empty.t.read(CONFIG_GENERATION, 4)
    irqs = len(empty.irqs)
    empty.t.change_device(lambda: empty.dev.insert(disk))
    assert not empty.dev.empty and empty.dev.inserted
    assert empty.t.read(CAPACITY, 8) == DISK_SECTORS
    assert empty.t.read(INTERRUPT_STATUS, 4) & M.INT_CONFIG_CHANGE
    assert empty.t.read(CONFIG_GENERATION, 4) == gen + 1 and len(empty.irqs) == irqs + 1
    assert empty.dev.features == EMPTY_FEATURES   # fixed since FEATURES_OK (§2.2)
    status, used, data = empty.request(B.VIRTIO_BLK_T_IN, 3, in_len=1024)
    assert status == OK and data == disk.read_bytes()[3 * 512:5 * 512]
    assert empty.request(B.VIRTIO_BLK_T_OUT, 1, out=b"w" * 512)[0] == OK
    assert disk.read_bytes()[512:1024] == b"w" * 512


def test_an_inserted_read_only_disk_refuses_writes_without_announcing_it(empty, disk):
    before = disk.read_bytes()
    empty.t.change_device(lambda: empty.dev.insert(disk, read_only=True))
    assert not empty.dev.features >> B.VIRTIO_BLK_F_RO & 1
    assert empty.request(B.VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)[0] == IOERR
    assert empty.request(B.VIRTIO_BLK_T_WRITE_ZEROES,
                         out=bytes(16))[0] in (IOERR, B.VIRTIO_BLK_S_UNSUPP)
    assert empty.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK
    assert disk.read_bytes() == before


def test_an_inserted_snapshot_disk_keeps_the_image(empty, disk):
    before = disk.read_bytes()
    empty.t.change_device(lambda: empty.dev.insert(disk, snapshot=True))
    assert empty.request(B.VIRTIO_BLK_T_OUT, 0, out=b"s" * 512)[0] == OK
    assert empty.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[2] == b"s" * 512
    assert disk.read_bytes() == before


def test_a_drive_takes_one_disk_and_a_bad_one_leaves_it_empty(empty, disk, tmp_path):
    with pytest.raises(B.BlockError):
        empty.dev.insert(tmp_path / "missing.img")
    assert empty.dev.empty and empty.t.read(CAPACITY, 8) == 0
    with pytest.raises(B.BlockError, match="20 ASCII"):
        empty.dev.insert(disk, serial="x" * 21)
    assert empty.dev.empty
    empty.dev.insert(disk)
    with pytest.raises(B.BlockError, match="holds"):
        empty.dev.insert(disk)


def test_a_full_drive_cannot_take_a_disk(disk, mem):
    e = Env(disk, mem)
    try:
        with pytest.raises(B.BlockError):
            e.dev.insert(disk)
    finally:
        e.dev.close()


def test_state_of_an_inserted_disk_restores_only_as_an_inserted_disk(empty, disk):
    empty.dev.insert(disk, read_only=True)
    state = empty.dev.save()
    again = B.VirtioBlk(disk, read_only=True, inserted=True)
    try:
        again.restore(state)
        assert again.save() == state and again.read_only
    finally:
        again.close()
    attached = B.VirtioBlk(disk, read_only=True)   # announced RO at boot: not the same
    try:
        with pytest.raises(DeviceStateError):
            attached.restore(state)
    finally:
        attached.close()


def test_empty_drive_state_round_trips(empty):
    state = empty.dev.save()
    again = B.VirtioBlk(None)
    again.restore(state)
    assert again.save() == state and again.empty
