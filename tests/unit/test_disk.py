"""The disk backend interface (vmm/disk), on each backend: the raw image and the
copy-on-write overlay. No VM, no virtio: buffers are plain bytearrays.

The overlay's own workings (copy-up, bitmap runs, temp files, SIGKILL) are in
test_overlay.py; virtio-blk's use of a backend in test_virtio_blk.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.disk import DiskBackend, DiskError, RawDisk, open_disk
from vmm.disk import base as D
from vmm.disk import overlay as O
from vmm.disk import raw as R

SIZE = 64 * 4096 + 3 * 512  # not a multiple of the overlay's 4 KiB block
REPO = Path(__file__).resolve().parents[2]


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 13 + seed + (i >> 9)) & 0xFF for i in range(n))


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SIZE))
    os.utime(p, ns=(10**18, 10**18))  # a fixed mtime: any write would move it
    return p


KINDS = ["raw", "overlay"]


def _open(kind: str, path, **kw) -> DiskBackend:
    return open_disk(path, snapshot=(kind == "overlay"), **kw)


@pytest.fixture(params=KINDS)
def disk(request, image):
    with _open(request.param, image) as d:
        yield d


def read(d: DiskBackend, off: int, n: int, splits=()) -> bytes:
    """Read n bytes at off into a buffer cut at ``splits`` (several views)."""
    buf = bytearray(n)
    mv = memoryview(buf)
    cuts = [0, *splits, n]
    views = [mv[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    assert d.readv(views, off) == n
    return bytes(buf)


def write(d: DiskBackend, off: int, data: bytes, splits=()) -> None:
    mv = memoryview(data)
    cuts = [0, *splits, len(data)]
    views = [mv[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    assert d.writev(views, off, len(data)) == len(data)


def _punch_hole_supported(path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        D.fallocate(fd, D.FALLOC_FL_PUNCH_HOLE | D.FALLOC_FL_KEEP_SIZE, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --- the interface, on each backend -----------------------------------------------------
def test_kinds(disk, request):
    assert isinstance(disk, DiskBackend)
    assert type(disk) is {"raw": RawDisk, "overlay": O.Overlay}[request.node.callspec.params["disk"]]
    assert disk.size == SIZE and not disk.read_only
    assert disk.supports_discard and disk.supports_write_zeroes
    st = os.stat(disk.path)
    assert disk.identity == f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}"


def test_vectors_round_trip(disk):
    image = bytearray(pattern(SIZE))
    payload = pattern(3 * 4096 + 1024, seed=99)
    off = 4096 + 1536  # not block aligned: the overlay copies up both edges
    write(disk, off, payload, splits=(512, 700, 9000))
    image[off:off + len(payload)] = payload
    assert read(disk, 0, SIZE, splits=(1, 4097, 5000, 20000)) == image
    assert read(disk, off, len(payload)) == payload
    # nbytes given or not, the same bytes
    buf = bytearray(2048)
    assert disk.readv([memoryview(buf)], off, 2048) == 2048 and buf == payload[:2048]


def test_read_at_the_end_is_short(disk):
    buf = bytearray(2048)
    assert disk.readv([memoryview(buf)[:1024], memoryview(buf)[1024:]], SIZE - 512) == 512
    assert buf[:512] == pattern(SIZE)[-512:]


def test_flush(image, monkeypatch):
    """writeback/none: fdatasync on the image; unsafe and the overlay: none."""
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    for kind, cache, syncs in [("raw", "writeback", True), ("raw", "none", True),
                               ("raw", "unsafe", False), ("overlay", "writeback", False)]:
        calls.clear()
        with _open(kind, image, cache=cache) as d:
            write(d, 0, b"f" * 512)
            d.flush()
            assert calls == ([d.fd] if syncs else []), (kind, cache)
            assert read(d, 0, 512) == b"f" * 512


def test_flush_error_raises(image, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fdatasync", fail)
    with RawDisk(image) as d, pytest.raises(OSError):
        d.flush()


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_reads_zeros(disk, unmap):
    image = pattern(SIZE)
    off, n = 3 * 4096 + 512, 5 * 4096  # partial blocks at both ends
    disk.write_zeroes(off, n, unmap)
    got = read(disk, 0, SIZE)
    assert got[off:off + n] == bytes(n)
    assert got[:off] == image[:off] and got[off + n:] == image[off + n:]


def test_discard_reads_zeros(disk, image):
    if isinstance(disk, RawDisk) and not _punch_hole_supported(_probe(image)):
        pytest.skip("filesystem lacks FALLOC_FL_PUNCH_HOLE: a raw discard is then a no-op")
    data = pattern(SIZE)
    off, n = 8 * 4096, 4 * 4096
    disk.discard(off, n)
    got = read(disk, 0, SIZE)
    assert got[off:off + n] == bytes(n)
    assert got[:off] == data[:off] and got[off + n:] == data[off + n:]


def _probe(image) -> Path:
    p = image.parent / "probe.img"
    p.write_bytes(b"x" * 8192)
    return p


def test_zeroes_without_fallocate(disk, monkeypatch):
    """A filesystem without PUNCH_HOLE / ZERO_RANGE: write-zeroes still zeroes, a raw
    discard leaves the data (a hint), the overlay's discard still zeroes."""
    def nope(*a):
        raise OSError(errno.EOPNOTSUPP, "not supported")
    monkeypatch.setattr(R, "fallocate", nope)
    monkeypatch.setattr(O, "fallocate", nope)
    image = pattern(SIZE)
    for unmap in (False, True):
        write(disk, 0, b"w" * 8192)
        disk.write_zeroes(1024, 4096, unmap)
        assert read(disk, 0, 8192) == b"w" * 1024 + bytes(4096) + b"w" * 3072
    disk.discard(16 * 4096, 4096)
    got = read(disk, 16 * 4096, 4096)
    assert got == (image[16 * 4096:17 * 4096] if isinstance(disk, RawDisk) else bytes(4096))


def test_fallocate_errors_are_raised(disk, monkeypatch):
    def eio(*a):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(R, "fallocate", eio)
    monkeypatch.setattr(O, "fallocate", eio)
    with pytest.raises(OSError):
        disk.write_zeroes(0, 4096, True)
    with pytest.raises(OSError):
        disk.discard(0, 4096)


def test_short_transfers_are_resumed(disk, monkeypatch):
    real_r, real_w = os.preadv, os.pwritev

    def trickle(real):
        return lambda fd, bufs, off: real(fd, [memoryview(bufs[0])[:100]], off)
    monkeypatch.setattr(os, "preadv", trickle(real_r))
    monkeypatch.setattr(os, "pwritev", trickle(real_w))
    payload = pattern(5000, seed=5)
    write(disk, 4096 - 512, payload, splits=(300,))
    assert read(disk, 4096 - 512, 5000, splits=(1234,)) == payload


# --- locking ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lock_refuses_a_read_write_second_open(image, kind):
    with _open(kind, image):
        with pytest.raises(DiskError, match=r"disk.img is in use by another VM$"):
            open_disk(image)
    with open_disk(image):  # closing dropped the lock
        pass


def test_lock_sharing(image):
    """Read-write is exclusive; snapshots and read-only opens share the image."""
    with open_disk(image):
        for kw in ({"read_only": True}, {"snapshot": True}):
            with pytest.raises(DiskError, match="in use by another VM"):
                open_disk(image, **kw)
    with open_disk(image, snapshot=True), open_disk(image, snapshot=True), \
            open_disk(image, read_only=True):
        pass


# --- read-only --------------------------------------------------------------------------
@pytest.mark.parametrize("snapshot", [False, True])
def test_read_only_refuses_writes(image, snapshot):
    before = image.read_bytes(), os.stat(image).st_mtime_ns
    with open_disk(image, read_only=True, snapshot=snapshot) as d:
        assert type(d) is RawDisk and d.read_only  # a read-only snapshot needs no overlay
        assert not d.supports_discard and not d.supports_write_zeroes
        for op in (lambda: d.writev([memoryview(b"x" * 512)], 0),
                   lambda: d.discard(0, 4096), lambda: d.write_zeroes(0, 4096, False)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS
        assert read(d, 0, 512) == pattern(512)
    assert (image.read_bytes(), os.stat(image).st_mtime_ns) == before


# --- the base under an overlay, and the raw image -----------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_only_raw_modifies_the_image(image, kind):
    """Every kind of write through an overlay leaves the image's bytes and mtime as they
    were (a raw disk, the control, changes both)."""
    before = image.read_bytes(), os.stat(image).st_mtime_ns
    with _open(kind, image) as d:
        write(d, 512, pattern(9000, seed=1))
        d.write_zeroes(20 * 4096 + 512, 8192, False)
        d.write_zeroes(30 * 4096, 8192, True)
        d.discard(40 * 4096, 4096)
        d.flush()
        seen = read(d, 0, SIZE)
    after = image.read_bytes(), os.stat(image).st_mtime_ns
    if kind == "overlay":
        assert after == before
    else:
        assert after[0] == seen and after[0] != before[0] and after[1] != before[1]


# --- opening: user errors are one line --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_open_errors_are_one_line(tmp_path, image, kind):
    cases = [
        (tmp_path / "nope.img", {}, "does not exist"),
        (tmp_path, {}, "is a directory"),
        (image, {"cache": "directsync"}, "unknown cache mode 'directsync'"),
    ]
    for path, kw, msg in cases:
        with pytest.raises(DiskError, match=msg) as e:
            _open(kind, path, **kw)
        assert "\n" not in str(e.value)
    if os.path.exists("/dev/null"):
        with pytest.raises(DiskError, match="not a regular file or block device"):
            _open(kind, "/dev/null")


def test_overlay_failure_closes_the_base(image, monkeypatch):
    monkeypatch.setattr(O, "overlay_dirs", lambda p: [str(image.parent / "no-such-dir")])
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DiskError, match="disk.img: cannot create a snapshot overlay"):
        open_disk(image, snapshot=True)
    assert len(os.listdir("/proc/self/fd")) == fds
    with open_disk(image):  # and its lock
        pass


def test_close_is_idempotent(disk):
    disk.close()
    disk.close()
    with pytest.raises(OSError):
        disk.readv([memoryview(bytearray(512))], 0)


def test_disk_does_not_import_devices():
    """vmm/disk sits below the device models (README "Habits" 11)."""
    code = ("import sys, vmm.disk, vmm.disk.overlay; "
            "bad = [m for m in sys.modules if m.startswith('vmm.devices')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
