"""Snapshot disks: the copy-on-write overlay (vmm/disk/overlay.py) and virtio-blk's
snapshot mode (vmm/devices/virtio/blk.py, ``snapshot=True``). No VM.

The interface both backends share is tested on each in test_disk.py; here, what is the
overlay's own.

What must hold: reads always see what was written (a bytearray model); the base image's
bytes and mtime never change; the overlay file leaves nothing behind, after close and
after SIGKILL; the OFD locks let snapshots share a base but keep read-write VMs off it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.devices.virtio import blk as B
from vmm.disk import RawDisk
from vmm.disk import overlay as O
from vmm.memory import GuestMemory

from .test_virtio_blk import DISK_SECTORS, Env, pattern, segment
from .test_virtio_queue import MEM_SIZE

OK, IOERR = B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR
REPO = Path(__file__).resolve().parents[2]


def _overlay_fds() -> set[str]:
    """Targets of this process's fds that are overlay files (O_TMPFILE: '/#123 (deleted)',
    mkstemp: '.pyvmm-overlay-... (deleted)')."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            out.add(target)
    return out


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    p = d / "base.img"
    p.write_bytes(pattern(DISK_SECTORS * 512))
    os.utime(p, ns=(10**18, 10**18))  # a fixed mtime: any write would move it
    return p


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


# --- the Overlay on its own -------------------------------------------------------------
def _ov_read(ov: O.Overlay, off: int, n: int, split: int | None = None) -> bytes:
    buf = bytearray(n)
    mv = memoryview(buf)
    views = [mv] if split is None else [mv[:split], mv[split:]]
    assert ov.readv([v for v in views if len(v)], off) == n
    return bytes(buf)


@pytest.fixture
def ov(base):
    o = O.Overlay(RawDisk(base, read_only=True), [str(base.parent)])
    yield o
    o.close()  # the base too


def test_overlay_copy_up_of_partial_blocks(ov, base):
    image = pattern(DISK_SECTORS * 512)
    ov.writev([memoryview(b"A" * 512)], 4096 + 1024)  # sector 2 of block 1
    assert ov.present(1) and not ov.present(0) and not ov.present(2)
    want = image[:5120] + b"A" * 512 + image[5632:12288]
    assert _ov_read(ov, 0, 12288, split=777) == want
    assert base.read_bytes() == image


def test_overlay_runs_and_mark():
    o = O.Overlay.__new__(O.Overlay)
    o.bitmap = bytearray(16)
    o._mark(3, 70)
    assert [b for b in range(128) if o.present(b)] == list(range(3, 70))
    assert list(o.runs(0, 128)) == [(0, 3, False), (3, 70, True), (70, 128, False)]
    assert list(o.runs(5, 9)) == [(5, 9, True)]
    o._mark(71, 72)
    assert list(o.runs(60, 80)) == [(60, 70, True), (70, 71, False), (71, 72, True),
                                    (72, 80, False)]


def test_overlay_zero_reads_zeros(ov, base):
    ov.zero(512, 3 * 4096)
    got = _ov_read(ov, 0, 5 * 4096)
    image = pattern(DISK_SECTORS * 512)
    assert got == image[:512] + bytes(3 * 4096) + image[512 + 3 * 4096:5 * 4096]


def test_overlay_zero_without_punch_hole(ov, monkeypatch):
    def nope(*a):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(O, "fallocate", nope)
    ov.zero(1024, 8192)
    assert _ov_read(ov, 1024, 8192) == bytes(8192)


def test_mkstemp_fallback_leaves_nothing(base, monkeypatch):
    """A filesystem without O_TMPFILE: the mkstemp file is unlinked at once."""
    real_open = os.open

    def no_tmpfile(path, flags, *a):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", no_tmpfile)
    before = set(os.listdir(base.parent))
    with O.Overlay(RawDisk(base, read_only=True), [str(base.parent)]) as o:
        assert set(os.listdir(base.parent)) == before
        o.writev([memoryview(b"x" * 512)], 0)
        assert any(O.TEMP_PREFIX in t for t in _overlay_fds())
    assert not any(O.TEMP_PREFIX in t for t in _overlay_fds())


def test_unwritable_directories(base, tmp_path, monkeypatch):
    """The base's directory is read-only: the overlay goes to the next directory; with
    none left, a one-line error naming TMPDIR."""
    other = tmp_path / "tmp"
    other.mkdir()
    real_open = os.open

    def deny(path, flags, *a):
        if str(path) == str(base.parent):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", deny)
    with O.Overlay(RawDisk(base, read_only=True), [str(base.parent), str(other)]) as o:
        assert o.directory == str(other)
    with RawDisk(base, read_only=True) as raw:  # a failed Overlay leaves the base open
        with pytest.raises(O.OverlayError, match="base.img: .*TMPDIR"):
            O.Overlay(raw, [str(base.parent)])
        assert raw.fd >= 0


def test_overlay_dirs_prefers_the_base_directory(base):
    dirs = O.overlay_dirs(str(base))
    assert dirs[0] == str(base.parent) and len(dirs) == len(set(dirs))


# --- the device in snapshot mode --------------------------------------------------------
def test_snapshot_out_then_in_through_the_transport(base, mem):
    before = _state(base)
    e = Env(base, mem, snapshot=True)
    try:
        assert e.dev.features >> B.VIRTIO_BLK_F_DISCARD & 1
        assert not e.dev.features >> B.VIRTIO_BLK_F_RO & 1
        payload = pattern(1536, seed=42)
        assert e.request(B.VIRTIO_BLK_T_OUT, 3, out=payload)[:2] == (OK, 1)
        status, used, data = e.request(B.VIRTIO_BLK_T_IN, 2, in_segs=[100, 412, 2048])
        image = before[0]
        assert (status, used) == (OK, 2561)
        assert data == image[1024:1536] + payload + image[3072:3584]
        assert e.request(B.VIRTIO_BLK_T_WRITE_ZEROES, out=segment(4, 2))[0] == OK
        assert e.request(B.VIRTIO_BLK_T_DISCARD, out=segment(16, 16))[0] == OK
        status, _, data = e.request(B.VIRTIO_BLK_T_IN, 0, in_len=32 * 512)
        assert data[:2048] == image[:1536] + payload[:512]
        assert data[2048:3072] == bytes(1024) and data[8192:] == bytes(8192)
        assert e.request(B.VIRTIO_BLK_T_OUT, DISK_SECTORS, out=b"x" * 512)[0] == IOERR
    finally:
        e.close()
    assert _state(base) == before


def test_snapshot_flush_does_not_sync(base, mem, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    e = Env(base, mem, snapshot=True)
    try:
        assert e.request(B.VIRTIO_BLK_T_OUT, 0, out=b"q" * 512)[0] == OK
        assert e.request(B.VIRTIO_BLK_T_FLUSH)[0] == OK and calls == []
    finally:
        e.close()


def test_snapshot_short_transfers_are_resumed(base, mem, monkeypatch):
    real_r, real_w = os.preadv, os.pwritev

    def trickle(real):
        return lambda fd, bufs, off: real(fd, [memoryview(bufs[0])[:100]], off)
    e = Env(base, mem, snapshot=True)
    try:
        monkeypatch.setattr(os, "preadv", trickle(real_r))
        monkeypatch.setattr(os, "pwritev", trickle(real_w))
        payload = pattern(1024, seed=3)
        assert e.request(B.VIRTIO_BLK_T_OUT, 7, out=payload)[0] == OK
        status, used, data = e.request(B.VIRTIO_BLK_T_IN, 6, in_segs=[300, 1236])
        image = base.read_bytes()
        assert (status, data) == (OK, image[3072:3584] + payload)
    finally:
        e.close()


def test_snapshot_write_error_is_ioerr(base, mem, monkeypatch):
    e = Env(base, mem, snapshot=True)
    try:
        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "pwritev", full)
        assert e.request(B.VIRTIO_BLK_T_OUT, 0, out=b"q" * 4096)[0] == IOERR
        monkeypatch.undo()
        assert e.request(B.VIRTIO_BLK_T_IN, 0, in_len=4096)[2] == base.read_bytes()[:4096]
    finally:
        e.close()


def test_snapshot_of_unwritable_image(base):
    """The base is only read: a file the user may not write works as a snapshot."""
    base.chmod(0o444)
    before = _state(base)
    try:
        with B.VirtioBlk(base, snapshot=True) as d:
            assert d.capacity == DISK_SECTORS
    finally:
        base.chmod(0o644)
    assert _state(base) == before


def test_snapshot_locks(base):
    with B.VirtioBlk(base, snapshot=True), B.VirtioBlk(base, snapshot=True), \
            B.VirtioBlk(base, read_only=True):
        with pytest.raises(B.BlockError, match="in use by another VM"):
            B.VirtioBlk(base)
    with B.VirtioBlk(base):
        with pytest.raises(B.BlockError, match="in use by another VM"):
            B.VirtioBlk(base, snapshot=True)


def test_read_only_snapshot_is_read_only(base):
    with B.VirtioBlk(base, snapshot=True, read_only=True) as d:
        assert d.features >> B.VIRTIO_BLK_F_RO & 1 and not d.snapshot
        assert type(d.backend) is RawDisk


def test_bad_serial_closes_the_overlay(base):
    fds = _overlay_fds()
    with pytest.raises(B.BlockError, match="at most 20"):
        B.VirtioBlk(base, snapshot=True, serial="x" * 21)
    assert _overlay_fds() == fds


def test_overlay_creation_failure_is_one_line(base, monkeypatch):
    monkeypatch.setattr(O, "overlay_dirs", lambda p: [str(base / "not-a-dir")])
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(B.BlockError, match="base.img: cannot create a snapshot overlay"):
        B.VirtioBlk(base, snapshot=True)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with B.VirtioBlk(base):  # the lock went with the fd
        pass


# --- model-based ------------------------------------------------------------------------
SMALL_SECTORS = 96  # 12 blocks of 4 KiB: runs, edges and copy-ups all get exercised

op_st = st.tuples(
    st.sampled_from(["write", "write", "read", "zero", "discard"]),
    st.integers(0, SMALL_SECTORS - 1),
    st.integers(1, 24),
    st.integers(0, 255),
    st.lists(st.integers(1, 9), max_size=3),  # how the guest buffer is split (sectors)
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=25), odd_tail=st.booleans())
def test_model(tmp_path_factory, ops, odd_tail):
    """Random writes/reads/zeroes through the device's request paths against a bytearray:
    every read matches; the base never changes; closing leaves nothing anywhere."""
    d = tmp_path_factory.mktemp("model")
    path = d / "base.img"
    size = SMALL_SECTORS * 512 + (300 if odd_tail else 0)  # size not a block multiple
    path.write_bytes(pattern(size, seed=7))
    before = _state(path)
    listing = sorted(os.listdir(d))
    fds = _overlay_fds()
    model = bytearray(before[0][:SMALL_SECTORS * 512])
    with GuestMemory(1 << 20) as mem, B.VirtioBlk(path, snapshot=True) as dev:
        dev.activate([], mem, None)
        for kind, sector, num, seed, split in ops:
            num = min(num, SMALL_SECTORS - sector)
            off, n = sector * 512, num * 512
            # the guest buffer, in pieces of whole sectors (plus the rest)
            segs, addr, left = [], 0x1000, n
            for k in split:
                k = min(k * 512, left)
                if k:
                    segs.append((addr, k))
                    addr += k + 64
                    left -= k
            if left:
                segs.append((addr, left))
            if kind == "write":
                data = pattern(n, seed)
                pos = 0
                for a, k in segs:
                    mem.write(a, data[pos:pos + k])
                    pos += k
                assert dev._write(sector, segs) == OK
                model[off:off + n] = data
            elif kind == "read":
                assert dev._read(sector, segs) == (OK, n)
                got = b"".join(mem.read(a, k) for a, k in segs)
                assert got == bytes(model[off:off + n])
            else:
                dev.backend.zero(off, n)
                model[off:off + n] = bytes(n)
        assert _overlay_fds() != fds
        # Everything reads back as the model, in one request.
        assert dev._read(0, [(0x1000, SMALL_SECTORS * 512)]) == (OK, SMALL_SECTORS * 512)
        assert mem.read(0x1000, SMALL_SECTORS * 512) == bytes(model)
        assert sorted(os.listdir(d)) == listing
    assert _state(path) == before
    assert _overlay_fds() == fds
    assert sorted(os.listdir(d)) == listing


# --- SIGKILL ----------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[2])
    from vmm.devices.virtio.blk import VirtioBlk
    dev = VirtioBlk(sys.argv[1], snapshot=True)
    data = memoryview(b"\\x5a" * (1 << 20))
    assert dev.backend.writev([data], 4096 + 512) == len(data)
    print(os.getpid(), flush=True)
    time.sleep(60)
""")


def test_sigkill_leaves_nothing(tmp_path, monkeypatch):
    d = tmp_path / "images"
    d.mkdir()
    path = d / "base.img"
    path.write_bytes(pattern(4 << 20))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = _state(path)
    listing = {p: sorted(os.listdir(p)) for p in (d, tmp_path / "tmp")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(REPO)],
                             stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert any(t.endswith("(deleted)") for t in targets)  # the overlay, nameless
        assert {p: sorted(os.listdir(p)) for p in listing} == listing
        os.kill(pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert {p: sorted(os.listdir(p)) for p in listing} == listing
    assert _state(path) == before
    # The base's lock died with the process: a read-write open works again.
    for _ in range(50):
        try:
            with B.VirtioBlk(path):
                break
        except B.BlockError:
            time.sleep(0.05)
    else:
        pytest.fail("base image still locked after the snapshot VM was killed")
