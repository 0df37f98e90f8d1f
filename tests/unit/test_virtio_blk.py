"""virtio-blk (vmm/devices/virtio/blk.py) behind the mmio transport, on a temp image.

No VM: MmioDriver (test_virtio_mmio.py) negotiates and sets up the queue through the
registers, requests are laid out in a real GuestMemory, and results are read back from
the used ring, the status byte and the image file.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.devices.virtio import blk as B
from vmm.devices.virtio import mmio as M
from vmm.disk import DiskBackend
from vmm.disk import raw as R
from vmm.memory import GuestMemory

try:
    from .test_virtio_mmio import MmioDriver
    from .test_virtio_queue import MEM_SIZE, Buffers
except ImportError:  # tests/unit is not a package
    from test_virtio_mmio import MmioDriver
    from test_virtio_queue import MEM_SIZE, Buffers

DISK_SECTORS = 2048  # 1 MiB
OK, IOERR, UNSUPP = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(n))


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SECTORS * 512))
    return path


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


class Env:
    def __init__(self, path, mem, **kw):
        self.dev = B.VirtioBlk(path, **kw)
        self.mem = mem
        self.irqs = []
        self.t = M.VirtioMmioTransport(self.dev, mem, lambda: self.irqs.append(1))
        self.d = MmioDriver(self.t, mem)
        self.rings = self.d.start()
        self.buf = Buffers(mem)

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                *, in_segs: list[int] | None = None, status_len: int = 1,
                indirect: bool = False, header: bytes | None = None):
        """Submit one request; returns (status, used_len, data read)."""
        hdr = struct.pack("<IIQ", rtype, 0, sector) if header is None else header
        bufs = [(self.buf.alloc(len(hdr), hdr), len(hdr), False)]
        if out:
            bufs.append((self.buf.alloc(len(out), out), len(out), False))
        ins = in_segs if in_segs is not None else ([in_len] if in_len else [])
        for n in ins:
            bufs.append((self.buf.alloc(n, b"\xee" * n), n, True))
        st_addr = self.buf.alloc(status_len, b"\xff" * status_len)
        bufs.append((st_addr, status_len, True))
        table = self.buf.alloc(16 * len(bufs)) if indirect else None
        head = self.d.submit(bufs, indirect_table=table)
        used = self.rings.take_used()
        assert len(used) == 1 and used[0][0] == head
        data = b"".join(self.mem.read(a, n) for a, n, w in bufs[:-1] if w)
        return self.mem.read(st_addr + status_len - 1, 1)[0], used[0][1], data

    def close(self):
        self.dev.close()


@pytest.fixture
def env(disk, mem):
    e = Env(disk, mem)
    yield e
    e.close()


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


# --- configuration and features (§5.2.3, §5.2.4) ----------------------------------------
def test_config_layout(env):
    t = env.t
    assert t.read(0x100, 4) | t.read(0x104, 4) << 32 == DISK_SECTORS
    assert t.read(0x100, 8) == DISK_SECTORS
    assert t.read(0x100 + 12, 4) == B.SEG_MAX
    assert t.read(0x100 + 20, 4) == 512
    assert t.read(0x100 + 36, 4) == B.MAX_DISCARD_SECTORS
    assert t.read(0x100 + 40, 4) == 1
    assert t.read(0x100 + 44, 4) == B.DISCARD_SECTOR_ALIGNMENT
    assert t.read(0x100 + 48, 4) == B.MAX_WRITE_ZEROES_SECTORS
    assert t.read(0x100 + 52, 4) == 1
    assert t.read(0x100 + 56, 1) == 1


@pytest.mark.parametrize("offset,size", [(1, 2), (2, 4), (8, 8), (12, 2), (20, 1),
                                         (16, 4), (60, 4), (0x1000, 4)])
def test_wrong_width_config_reads_zero(env, offset, size):
    assert env.t.read(0x100 + offset, size) == 0


def test_config_writes_ignored(env):
    env.t.write(0x100, 4, 0)
    env.t.write(0x100 + 32, 1, 1)
    assert env.t.read(0x100, 4) == DISK_SECTORS and env.t.read(0x100 + 32, 1) == 0


def test_features(disk, mem):
    with B.VirtioBlk(disk) as rw:
        f = rw.features
        for bit in (32, B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_SEG_MAX,
                    B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES):
            assert f >> bit & 1
        assert not f >> B.VIRTIO_BLK_F_RO & 1
    with B.VirtioBlk(disk, read_only=True) as ro:
        assert ro.features >> B.VIRTIO_BLK_F_RO & 1
        assert not ro.features >> B.VIRTIO_BLK_F_DISCARD & 1


# --- IN / OUT ------------------------------------------------------------------------------
def test_read(env, disk):
    status, used, data = env.request(B.VIRTIO_BLK_T_IN, 3, in_len=1024)
    assert status == OK and used == 1025
    assert data == disk.read_bytes()[3 * 512:5 * 512]
    assert env.irqs


def test_read_scattered_and_indirect(env, disk):
    image = disk.read_bytes()
    status, used, data = env.request(B.VIRTIO_BLK_T_IN, 10, in_segs=[100, 412, 1536],
                                     indirect=True)
    assert status == OK and used == 2049 and data == image[10 * 512:14 * 512]


def test_write(env, disk):
    payload = pattern(1536, seed=99)
    status, used, _ = env.request(B.VIRTIO_BLK_T_OUT, 100, out=payload)
    assert status == OK and used == 1
    image = disk.read_bytes()
    assert image[100 * 512:103 * 512] == payload and len(image) == DISK_SECTORS * 512
    status, _, data = env.request(B.VIRTIO_BLK_T_IN, 100, in_len=1536)
    assert status == OK and data == payload


def test_header_and_data_in_one_descriptor(env, disk):
    """§2.7.4: the device must not depend on how the driver splits the request."""
    payload = pattern(512, seed=5)
    hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 7) + payload
    status, _, _ = env.request(0, header=hdr)
    assert status == OK and disk.read_bytes()[7 * 512:8 * 512] == payload


def test_status_in_a_longer_descriptor(env, disk):
    """The status is the last device-writable byte; IN data precedes it."""
    status, used, data = env.request(B.VIRTIO_BLK_T_IN, 0, status_len=513)
    assert status == OK and used == 513


@pytest.mark.parametrize("sector,n", [
    (DISK_SECTORS, 512),  # just past the end
    (DISK_SECTORS - 1, 1024),  # straddles the end
    ((1 << 64) - 1, 512),  # sector * 512 overflows u64
    ((1 << 55), 512),
])
def test_sector_past_end(env, disk, sector, n):
    before = disk.read_bytes()
    assert env.request(B.VIRTIO_BLK_T_IN, sector, in_len=n)[0] == IOERR
    assert env.request(B.VIRTIO_BLK_T_OUT, sector, out=b"x" * n)[:2] == (IOERR, 1)
    assert disk.read_bytes() == before


def test_last_sector_ok(env):
    assert env.request(B.VIRTIO_BLK_T_IN, DISK_SECTORS - 1, in_len=512)[0] == OK


@pytest.mark.parametrize("n", [0, 1, 511, 513])
def test_unaligned_or_empty_data(env, disk, n):
    before = disk.read_bytes()
    assert env.request(B.VIRTIO_BLK_T_IN, 0, in_len=n)[:2] == (IOERR, 1)
    assert env.request(B.VIRTIO_BLK_T_OUT, 0, out=b"y" * n)[0] == IOERR
    assert disk.read_bytes() == before


def test_read_only_refuses_writes(disk, mem):
    before = disk.read_bytes()
    e = Env(disk, mem, read_only=True)
    try:
        assert e.request(B.VIRTIO_BLK_T_OUT, 0, out=b"z" * 512)[0] == IOERR
        assert e.request(B.VIRTIO_BLK_T_DISCARD, out=segment(0, 8))[0] == IOERR
        assert e.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 8))[0] == IOERR
        assert e.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK
        assert e.request(B.VIRTIO_BLK_T_FLUSH)[0] == OK
    finally:
        e.close()
    assert disk.read_bytes() == before


@pytest.mark.parametrize("rtype", [2, 3, 5, B.VIRTIO_BLK_T_GET_LIFETIME,
                                   B.VIRTIO_BLK_T_SECURE_ERASE, 0xFFFFFFFF])
def test_unknown_types_unsupported(env, rtype):
    assert env.request(rtype, 0, in_len=512)[:2] == (UNSUPP, 1)


# --- FLUSH, GET_ID ------------------------------------------------------------------------
def test_flush_calls_fdatasync(env, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    assert env.request(B.VIRTIO_BLK_T_FLUSH) == (OK, 1, b"")
    assert calls == [env.dev.backend.fd]


def test_flush_error_is_ioerr(env, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fdatasync", fail)
    assert env.request(B.VIRTIO_BLK_T_FLUSH)[0] == IOERR


def test_unsafe_cache_skips_flush(disk, mem, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    e = Env(disk, mem, cache="unsafe")
    try:
        assert e.request(B.VIRTIO_BLK_T_FLUSH)[0] == OK and calls == []
    finally:
        e.close()


def test_get_id(disk, mem):
    e = Env(disk, mem, serial="pyvmm-disk-0")
    try:
        status, used, data = e.request(B.VIRTIO_BLK_T_GET_ID, in_len=20)
        assert status == OK and used == 21 and data == b"pyvmm-disk-0".ljust(20, b"\0")
        status, used, data = e.request(B.VIRTIO_BLK_T_GET_ID, in_len=5)  # too small
        assert status == OK and used == 6 and data == b"pyvmm"
        status, used, data = e.request(B.VIRTIO_BLK_T_GET_ID, in_len=64)  # larger
        assert used == 21 and data[:20] == b"pyvmm-disk-0".ljust(20, b"\0")
        assert data[20:] == b"\xee" * 44
    finally:
        e.close()


def test_default_serial(env):
    status, _, data = env.request(B.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert status == OK and data.rstrip(b"\0")


# --- DISCARD / WRITE_ZEROES ---------------------------------------------------------------
def _punch_hole_supported(path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        R.fallocate(fd, R.FALLOC_FL_PUNCH_HOLE | R.FALLOC_FL_KEEP_SIZE, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_discard_punches_hole(tmp_path, mem):
    path = tmp_path / "hole.img"
    path.write_bytes(pattern(DISK_SECTORS * 512))
    os.sync()
    probe = tmp_path / "probe.img"
    probe.write_bytes(b"x" * 8192)
    if not _punch_hole_supported(probe):
        pytest.skip("filesystem lacks FALLOC_FL_PUNCH_HOLE")
    e = Env(path, mem)
    try:
        before = os.stat(path).st_blocks
        status, used, _ = e.request(B.VIRTIO_BLK_T_DISCARD, out=segment(256, 1024))
        assert (status, used) == (OK, 1)
        st = os.stat(path)
        assert st.st_blocks < before and st.st_size == DISK_SECTORS * 512
        image = path.read_bytes()
        assert image[256 * 512:1280 * 512] == bytes(1024 * 512)
        assert image[:256 * 512] == pattern(DISK_SECTORS * 512)[:256 * 512]
    finally:
        e.close()


@pytest.mark.parametrize("flags", [0, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(env, disk, flags):
    status, _, _ = env.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(9, 3, flags))
    assert status == OK
    image = disk.read_bytes()
    assert image[9 * 512:12 * 512] == bytes(1536) and len(image) == DISK_SECTORS * 512
    assert image[8 * 512:9 * 512] == pattern(DISK_SECTORS * 512)[8 * 512:9 * 512]


def test_write_zeroes_without_fallocate_support(env, disk, monkeypatch):
    def nope(*a):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(R, "fallocate", nope)
    assert env.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(0, 4))[0] == OK
    assert disk.read_bytes()[:2048] == bytes(2048)
    assert env.request(B.VIRTIO_BLK_T_DISCARD, out=segment(0, 4))[0] == OK  # a hint


@pytest.mark.parametrize("rtype,data,expect", [
    (B.VIRTIO_BLK_T_DISCARD, segment(0, 8, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), UNSUPP),
    (B.VIRTIO_BLK_T_DISCARD, segment(0, 8, 2), UNSUPP),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 8, 4), UNSUPP),
    (B.VIRTIO_BLK_T_DISCARD, segment(0, 8) + segment(16, 8), UNSUPP),  # > max_discard_seg
    (B.VIRTIO_BLK_T_DISCARD, segment(DISK_SECTORS - 4, 8), IOERR),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, segment((1 << 64) - 1, 2), IOERR),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, B.MAX_WRITE_ZEROES_SECTORS + 1), IOERR),
    (B.VIRTIO_BLK_T_DISCARD, segment(0, 8)[:15], IOERR),
    (B.VIRTIO_BLK_T_DISCARD, b"", IOERR),
])
def test_bad_discard_segments(env, disk, rtype, data, expect):
    before = disk.read_bytes()
    assert env.request(rtype, out=data)[0] == expect
    assert disk.read_bytes() == before


# --- malformed requests -------------------------------------------------------------------
def test_short_header(env):
    assert env.request(0, header=b"\0" * 15, in_len=512)[0] == IOERR


def test_no_status_byte(env):
    hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0)
    head = env.d.submit([(env.buf.alloc(16, hdr), 16, False)])
    assert env.rings.take_used() == [(head, 0)]


def test_readable_after_writable(env, disk):
    before = disk.read_bytes()
    hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0)
    a = env.buf.alloc(16, hdr)
    w = env.buf.alloc(1, b"\xff")
    data = env.buf.alloc(512, b"q" * 512)
    s = env.buf.alloc(1, b"\xff")
    env.d.submit([(a, 16, False), (w, 1, True), (data, 512, False), (s, 1, True)])
    assert env.rings.take_used()[0][1] == 1
    assert env.mem.read(s, 1) == bytes([IOERR]) and disk.read_bytes() == before


def test_data_descriptor_outside_ram(env, disk):
    before = disk.read_bytes()
    hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0)
    s = env.buf.alloc(1, b"\xff")
    env.d.submit([(env.buf.alloc(16, hdr), 16, False), (MEM_SIZE - 256, 512, True),
                  (s, 1, True)])
    assert env.rings.take_used()[0][1] == 1 and env.mem.read(s, 1) == bytes([IOERR])
    assert disk.read_bytes() == before


def test_status_descriptor_outside_ram(env):
    hdr = struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0)
    data = env.buf.alloc(512, b"\xee" * 512)
    head = env.d.submit([(env.buf.alloc(16, hdr), 16, False), (data, 512, True),
                         ((1 << 64) - 1, 1, True)])
    assert env.rings.take_used() == [(head, 0)]
    assert env.mem.read(data, 512) == b"\xee" * 512  # nothing written into the data either


def test_looping_chain_completed_empty_and_queue_survives(env):
    r = env.rings
    from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
    r.set_desc(0, 0x100000, 16, VIRTQ_DESC_F_NEXT, 1)
    r.set_desc(1, 0x100000, 16, VIRTQ_DESC_F_NEXT, 0)
    r.next_desc = 2
    r.publish(0)
    env.d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    assert r.take_used() == [(0, 0)]
    assert not env.t.status & M.STATUS_DEVICE_NEEDS_RESET
    assert env.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK


def test_avail_run_ahead_needs_reset(env):
    env.rings.set_avail_idx(env.rings.avail_idx + 17)
    env.t.notify(0)  # no exception
    assert env.t.status & M.STATUS_DEVICE_NEEDS_RESET
    assert env.t.interrupt_status & M.INT_CONFIG_CHANGE
    env.d.w(M.STATUS_OFFSET, 0)  # reset and start over
    env.rings = env.d.start()
    assert env.request(B.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == OK


# --- opening images (user errors are one line) -----------------------------------------
def test_missing_image(tmp_path):
    with pytest.raises(B.BlockError, match="does not exist"):
        B.VirtioBlk(tmp_path / "nope.img")


def test_directory_image(tmp_path):
    with pytest.raises(B.BlockError, match="is a directory"):
        B.VirtioBlk(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image(disk):
    disk.chmod(0)
    try:
        with pytest.raises(B.BlockError, match="permission denied"):
            B.VirtioBlk(disk)
    finally:
        disk.chmod(0o644)


def test_permission_denied(disk, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(B.BlockError, match="for writing .*permission denied"):
        B.VirtioBlk(disk)


def test_short_transfers_are_resumed(env, disk, monkeypatch):
    """preadv/pwritev may move fewer bytes than asked; the device carries on."""
    real_r, real_w = os.preadv, os.pwritev

    def trickle(real):
        def f(fd, bufs, off):
            return real(fd, [memoryview(bufs[0])[:100]], off)
        return f
    monkeypatch.setattr(os, "preadv", trickle(real_r))
    monkeypatch.setattr(os, "pwritev", trickle(real_w))
    payload = pattern(1024, seed=3)
    assert env.request(B.VIRTIO_BLK_T_OUT, 4, out=payload)[0] == OK
    status, used, data = env.request(B.VIRTIO_BLK_T_IN, 4, in_segs=[300, 724])
    assert (status, used, data) == (OK, 1025, payload)


def test_image_shrunk_under_us(env, disk):
    os.truncate(disk, 4096)
    assert env.request(B.VIRTIO_BLK_T_IN, 100, in_len=512)[0] == IOERR


def test_bad_options(disk):
    with pytest.raises(B.BlockError, match="cache mode"):
        B.VirtioBlk(disk, cache="directsync")
    with pytest.raises(B.BlockError, match="at most 20"):
        B.VirtioBlk(disk, serial="x" * 21)


def test_second_opener_is_refused(disk):
    with B.VirtioBlk(disk):
        with pytest.raises(B.BlockError, match="disk.img is in use by another VM"):
            B.VirtioBlk(disk)
        with pytest.raises(B.BlockError, match="in use by another VM"):
            B.VirtioBlk(disk, read_only=True)
    with B.VirtioBlk(disk, read_only=True), B.VirtioBlk(disk, read_only=True):
        with pytest.raises(B.BlockError, match="in use"):
            B.VirtioBlk(disk)
    with B.VirtioBlk(disk):  # closing released the lock
        pass


def test_odd_sized_image(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(b"a" * 1500)
    with B.VirtioBlk(p) as d:
        assert d.capacity == 2


# --- properties ------------------------------------------------------------------------------
GUARD = 0xA5
REGION = (0x100000, 0x140000)

buf_st = st.tuples(st.sampled_from([0, 1, 15, 16, 17, 20, 64, 511, 512, 513, 1024, 4096]),
                   st.booleans(),  # device-writable
                   st.sampled_from(["ram", "ram", "ram", "outside", "overflow"]))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 2, 10, 99]),
       sector=st.one_of(st.integers(0, DISK_SECTORS + 8), st.integers(0, (1 << 64) - 1)),
       seg=st.tuples(st.integers(0, DISK_SECTORS + 8), st.integers(0, 64), st.integers(0, 3)),
       bufs=st.lists(buf_st, min_size=0, max_size=6),
       indirect=st.booleans())
def test_random_requests(env, disk, rtype, sector, seg, bufs, indirect):
    """No exception escapes; nothing outside the device-writable buffers changes in
    guest RAM; the image keeps its size; a completed request has a valid status."""
    mem = env.mem
    lo, hi = REGION
    mem.view(lo, hi - lo)[:] = bytes([GUARD]) * (hi - lo)
    env.buf = Buffers(mem, lo)
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    if rtype in (11, 13):
        hdr += segment(*seg)
    chain = [(env.buf.alloc(len(hdr), hdr, align=64), len(hdr), False)]
    writable = []
    for n, w, where in bufs:
        addr = env.buf.alloc(n, align=64) if where == "ram" else (
            MEM_SIZE - n // 2 if where == "outside" else (1 << 64) - 8)
        chain.append((addr, n, w))
        if w and where == "ram":
            writable.append((addr, n))
    table = env.buf.alloc(16 * len(chain), align=64) if indirect else None
    if table is not None:
        writable.append((table, 16 * len(chain)))  # written by the driver in submit()
    snapshot = mem.read(lo, hi - lo)
    head = env.d.submit(chain, indirect_table=table)
    used = env.rings.take_used()
    assert len(used) == 1 and used[0][0] == head
    assert not env.t.status & M.STATUS_DEVICE_NEEDS_RESET
    after = mem.read(lo, hi - lo)
    expected = bytearray(snapshot)  # what may change: the writable buffers only
    for a, n in writable:
        expected[a - lo:a - lo + n] = after[a - lo:a - lo + n]
    assert after == expected
    if used[0][1] > 0:
        last = next(((a, n) for a, n, w in reversed(chain) if w and n), None)
        assert last is not None
        assert mem.read(last[0] + last[1] - 1, 1)[0] in (OK, IOERR, UNSUPP)
    assert os.stat(disk).st_size == DISK_SECTORS * 512


# --- the backend: blk speaks virtio only, the data is the backend's ----------------------
class MemDisk(DiskBackend):
    """A disk in a bytearray, without discard: blk must need nothing but the interface."""

    path = "memdisk"
    identity = "mem0"

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.size = len(data)
        self.calls = []
        self.closed = False

    def readv(self, views, offset, nbytes=-1):
        self.calls.append("readv")
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)
        return sum(len(v) for v in views)

    def writev(self, views, offset, nbytes=-1):
        self.calls.append("writev")
        for v in views:
            self.data[offset:offset + len(v)] = v
            offset += len(v)
        return sum(len(v) for v in views)

    def flush(self):
        self.calls.append("flush")

    def write_zeroes(self, offset, length, unmap):
        self.calls.append(("write_zeroes", unmap))
        self.data[offset:offset + length] = bytes(length)

    def close(self):
        self.closed = True


def test_any_backend(mem):
    image = pattern(64 * 512)
    backend = MemDisk(image)
    backend.supports_write_zeroes = True
    e = Env(backend, mem)
    try:
        f = e.dev.features
        assert f >> B.VIRTIO_BLK_F_WRITE_ZEROES & 1 and not f >> B.VIRTIO_BLK_F_DISCARD & 1
        assert e.t.read(0x100, 8) == 64  # capacity from backend.size
        assert e.request(B.VIRTIO_BLK_T_OUT, 2, out=b"m" * 1024)[0] == OK
        status, _, data = e.request(B.VIRTIO_BLK_T_IN, 1, in_segs=[512, 1024])
        assert (status, data) == (OK, image[512:1024] + b"m" * 1024)
        assert e.request(B.VIRTIO_BLK_T_FLUSH)[0] == OK
        assert e.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(2, 1, 1))[0] == OK
        assert backend.data[1024:1536] == bytes(512)
        # DISCARD was not offered (the backend cannot): UNSUPP, and the backend untouched
        assert e.request(B.VIRTIO_BLK_T_DISCARD, out=segment(0, 8))[0] == UNSUPP
        status, _, data = e.request(B.VIRTIO_BLK_T_GET_ID, in_len=20)
        assert data == b"mem0".ljust(20, b"\0")
        assert backend.calls == ["writev", "readv", "flush", ("write_zeroes", True)]
    finally:
        e.close()
    assert backend.closed
