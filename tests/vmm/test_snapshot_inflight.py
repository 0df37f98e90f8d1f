"""A virtio-blk write in flight at snapshot time completes after restore and reaches the
disk (issue #11).

guests/tiny/blkinflight.c makes one write request of a known pattern available without
notifying the device, prints "inflight: available" and polls the used ring (bounded).
The VM is snapshotted on that line, with the request available and not used; the disk
does not hold the pattern yet. A new Machine restored from the snapshot serves it
before its vCPUs run (persist.after_restore -> VirtioMmioTransport.kick_all): the guest
sees VIRTIO_BLK_S_OK (exit status 0) and the pattern is on the disk. Without that kick
the restored guest waits in vain (status 30) and the disk stays as it was.
"""

from __future__ import annotations

import os
import struct
import threading

import pytest

from tests.conftest import requires_kvm
from tests.vmm.test_snapshot import restore_and_run
from vmm.config import DiskConfig, ExitReason, MachineConfig
from vmm.machine import Machine
from vmm.snapshot import persist

pytestmark = requires_kvm

MiB = 1 << 20
U64 = (1 << 64) - 1
SECTOR, LEN = 8, 4096               # blkinflight.c's defaults
MARKER = b"inflight: available\n"
OK, TIMED_OUT = 0, 30               # blkinflight.c's exit statuses


def pattern(offset: int, size: int) -> bytes:
    """What blkinflight.c writes at disk byte ``offset`` (blkbench.c's pattern)."""
    return struct.pack(f"<{size // 8}Q", *(((off * 0x9E3779B97F4A7C15) & U64) ^ 0x5CA1AB1E00000000
                                           for off in range(offset, offset + size, 8)))


def written(disk) -> bytes:
    with open(disk, "rb") as f:
        f.seek(SECTOR * 512)
        return f.read(LEN)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))
    return path


def boot_and_snapshot(tiny, disk, directory, loop, timeout_tsc=None):
    """Run blkinflight until its marker line, then snapshot it and end the VM."""
    out = bytearray()
    seen = threading.Event()

    def console(data):
        out.extend(data)
        if MARKER in out:
            seen.set()

    defines = {} if timeout_tsc is None else {"TIMEOUT_TSC": timeout_tsc}
    cfg = MachineConfig(kernel=tiny("blkinflight", defines), mem_size=32 << 20, loop=loop,
                        console=console, disks=[DiskConfig(disk)])
    infos = []
    with Machine(cfg) as m:
        def saver():
            if seen.wait(60):
                infos.append(m.snapshot(str(directory), end=True))

        t = threading.Thread(target=saver)
        t.start()
        try:
            result = m.run(timeout=60)
        finally:
            seen.set()
            t.join()
    return result, bytes(out), infos


@pytest.mark.parametrize("loop", ["shim", "python"])
def test_write_in_flight_at_snapshot_completes_after_restore(tiny, tmp_path, disk, loop):
    before_disk = disk.read_bytes()
    want = pattern(SECTOR * 512, LEN)
    snap_dir = tmp_path / "snap"
    result, before, infos = boot_and_snapshot(tiny, disk, snap_dir, loop)
    assert (result.reason, result.status) == (ExitReason.SNAPSHOTTED, 0), (result, before)
    assert before == MARKER and infos
    assert disk.read_bytes() == before_disk          # the request was not served yet

    result, after = restore_and_run(snap_dir, loop)
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, OK), (result, after)
    assert after == b"inflight: done\n"
    assert written(disk) == want
    data = disk.read_bytes()                         # nothing else was touched
    assert data[:SECTOR * 512] == before_disk[:SECTOR * 512]
    assert data[SECTOR * 512 + LEN:] == before_disk[SECTOR * 512 + LEN:]


def test_without_the_restore_kick_the_request_stays_unserved(tiny, tmp_path, disk,
                                                             monkeypatch):
    # The test above can fail: its request is served only by the kick after restore.
    # (A short guest timeout, 2^31 cycles, about 1 s here, keeps this one quick.)
    before_disk = disk.read_bytes()
    snap_dir = tmp_path / "snap"
    result, before, _ = boot_and_snapshot(tiny, disk, snap_dir, "shim", timeout_tsc=1 << 31)
    assert (result.reason, result.status) == (ExitReason.SNAPSHOTTED, 0), (result, before)
    monkeypatch.setattr(persist, "after_restore", lambda machine: None)
    result, after = restore_and_run(snap_dir, "shim")
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, TIMED_OUT), (result, after)
    assert after == b"inflight: timed out\n"
    assert disk.read_bytes() == before_disk
