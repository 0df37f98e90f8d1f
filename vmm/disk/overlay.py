"""Copy-on-write overlay over a read-only base disk ("snapshot" disks).

A :class:`~vmm.disk.base.DiskBackend` over another one, the base (a raw image opened
read-only and shared-locked), which it only ever reads. Every write goes to an *unlinked* temporary file of
the same size (sparse), and a bitmap records which blocks of ``BLOCK_SIZE`` bytes live
in the overlay. Nothing the guest writes survives the VM, and nothing is left behind on
the host: the overlay file never has a name (``O_TMPFILE``), or loses it at once
(``mkstemp`` + ``unlink`` where the filesystem lacks ``O_TMPFILE``), so the kernel frees
it when the last fd closes -- also when the VMM is killed with SIGKILL.

* Reads are split into runs of blocks that are all in the overlay or all in the base,
  and each run is one ``preadv`` (or one ``readv`` of the base) straight into the
  caller's buffers (views of guest memory); no data is copied through Python objects.
* Writes go to the overlay with ``pwritev``. Requests are sector (512-byte) aligned,
  not block aligned, so a write that covers a block only partly first copies that block
  from the base ("copy-up"); then the block's bit is set.
* Discard and write-zeroes alike copy up partial edge blocks, punch a hole in the
  overlay (or write zeros), and mark the blocks: afterwards reads return zeros. (A
  discard reads back as zeros too: deterministic, and the overlay cannot "deallocate"
  back to the base.)
* Nothing needs to survive, so there is nothing to flush: ``flush`` returns at once.

Snapshots: :meth:`Overlay.save_file` writes the overlay into one self-describing
file: bytes ``[0, size)`` are the disk's blocks that are in the overlay at their own
offsets and holes elsewhere (sparse: only the blocks in the overlay, and of those only
the ones not all zeros, take space), then the block map (one bit per block, as in
memory), then a 32-byte trailer (magic ``PYVMMCOW``, le32 version 1, le32 block size,
le64 disk size, le64 reserved). :meth:`Overlay.save_to` does that into a snapshot
directory and returns a plain-data state naming the file. :meth:`Overlay.open_file`
(or :meth:`Overlay.reopen` with that state) builds a new overlay over the same base
from it: a new private unlinked file like any overlay's, into which the saved blocks
are copied, so the snapshot's file is only ever read -- restoring one snapshot twice
gives two overlays that share nothing writable. ``open_disk(..., snapshot=True,
overlay_file=path)`` or ``overlay_from=(directory, state)`` (vmm/disk/__init__.py)
does that for a path.

Memory is bounded by the image size: the bitmap holds one bit per block
(size / 32 KiB bytes: 32 MiB for a 1 TiB image). Disk use of the overlay is bounded by
what the guest writes, at most the image size.

Thread-safety: an Overlay is not locked. virtio-blk serves a device's requests on the
VMM's one I/O thread, serialised by the transport's ``_io_lock`` (see
vmm/devices/virtio/mmio.py, "Locking"), so no two calls run at once.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import tempfile

from .base import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, NO_FALLOCATE, DiskBackend,
                   DiskError, fallocate, full_io, write_zeros)

#: Copy-on-write granularity: the usual page and filesystem block size, and virtio-blk's
#: discard_sector_alignment, so a Linux guest's writes are mostly whole blocks.
BLOCK_SHIFT = 12
BLOCK_SIZE = 1 << BLOCK_SHIFT

#: Name prefix of an overlay file in the short window before ``unlink`` (mkstemp path).
TEMP_PREFIX = ".pyvmm-overlay-"

# errnos of open(O_TMPFILE) that mean "this filesystem or kernel cannot", not "no access".
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


class OverlayError(DiskError):
    """No overlay file could be created (one line, meant for the user)."""


class OverlayStateError(OverlayError, ValueError):
    """A saved overlay that cannot be reopened: bad state, missing or wrong-sized files
    (one line)."""


#: Bytes copied at a time when saving or reopening an overlay.
COPY_CHUNK = 1 << 20
#: The keys of Overlay.save_to()'s state (besides "v").
_STATE_KEYS = ("file", "size", "block_size")
#: The end of a saved overlay file: magic, version, block size, disk size, reserved.
_TRAILER = struct.Struct("<8sIIQQ")
_MAGIC = b"PYVMMCOW"


def _check_name(name: object, what: str) -> str:
    """``name`` if it is a plain file name (no directory part, not hidden)."""
    if (not isinstance(name, str) or not name or name.startswith(".")
            or "/" in name or "\0" in name):
        raise OverlayStateError(f"{what} {name!r} is not a plain file name")
    return name


def _copy_blocks(runs, size: int, src: int, dst: int) -> None:
    """Copy the blocks of the ``(start, end, in_overlay)`` runs that are in the overlay
    from fd ``src`` to fd ``dst`` at the same offsets, leaving holes where a chunk is all
    zeros (``dst`` is sparse: holes read as zeros). Raises OSError."""
    for b0, b1, here in runs:
        if not here:
            continue
        off, end = b0 << BLOCK_SHIFT, min(b1 << BLOCK_SHIFT, size)
        while off < end:
            n = min(COPY_CHUNK, end - off)
            data = os.pread(src, n, off)
            if len(data) != n:
                raise OSError(errno.EIO, "overlay data file is shorter than the disk")
            if data.count(0) != n:
                if os.pwrite(dst, data, off) != n:
                    raise OSError(errno.EIO, "short write")
            off += n


def _open_unlinked(directory: str) -> int:
    """An fd on a new, nameless, empty file in ``directory``. Raises OSError."""
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(directory, flags | tmpfile, 0o600)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
    # No O_TMPFILE: create and unlink at once. A SIGKILL between the two (a few
    # microseconds) would leave a file named TEMP_PREFIX* behind; nothing else can.
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.unlink(name)  # (mkstemp's fd is already close-on-exec: PEP 446)
    except BaseException:
        os.close(fd)
        raise
    return fd


def overlay_dirs(base_path: str) -> list[str]:
    """Where an overlay for ``base_path`` may go, best first: the base's own directory
    (usually a disk filesystem with room for an image), then $TMPDIR (often tmpfs: RAM)."""
    dirs = [os.path.dirname(os.path.abspath(base_path)), tempfile.gettempdir()]
    return list(dict.fromkeys(dirs))


class Overlay(DiskBackend):
    """A copy-on-write layer over ``base``, which it reads, never writes, and closes
    with itself (the base's shared lock lasts as long as the overlay).

    Args:
        base: the base disk (read-only is enough).
        dirs: directories to try for the overlay file, in order.
    Raises:
        OverlayError: no directory could hold the overlay file (the base stays open:
            the caller that opened it closes it).
    """

    read_only = False
    supports_discard = supports_write_zeroes = True

    def __init__(self, base: DiskBackend, dirs: list[str]):
        self.base = base
        self.path = base.path
        self.identity = base.identity
        self.size = size = base.size
        self.nblocks = -(-size // BLOCK_SIZE)
        #: Bit b set: block b's current contents are in the overlay file.
        self.bitmap = bytearray(-(-self.nblocks // 8))
        self.fd = -1
        errors = []
        for d in dirs:
            try:
                fd = _open_unlinked(d)
            except OSError as e:
                errors.append(f"{d}: {e.strerror}")
                continue
            try:
                os.ftruncate(fd, size)  # sparse: takes no space until written
            except OSError as e:
                os.close(fd)
                errors.append(f"{d}: {e.strerror}")
                continue
            self.fd = fd
            self.directory = d
            break
        else:
            raise OverlayError(f"{base.path}: cannot create a snapshot overlay file ("
                               + "; ".join(errors) + "); set TMPDIR to a writable directory")

    # -- snapshots (see the module docstring) ---------------------------------------
    def save_file(self, path: str | os.PathLike) -> None:
        """Write this overlay into one self-describing file at ``path`` (the layout is
        in the module docstring), through a temporary name and a rename, synced.

        Call it while no request is being served (the VM paused): an overlay is not
        locked (see the module docstring).

        Raises:
            OSError: the file cannot be written.
        """
        path = os.fspath(path)
        directory, fname = os.path.split(path)
        tmp = os.path.join(directory, f".{fname}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            _copy_blocks(self.runs(0, self.nblocks), self.size, self.fd, fd)
            tail = bytes(self.bitmap) + _TRAILER.pack(_MAGIC, 1, BLOCK_SIZE, self.size, 0)
            if os.pwrite(fd, tail, self.size) != len(tail):
                raise OSError(errno.EIO, "short write")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def save_to(self, directory: str | os.PathLike, name: str) -> dict:
        """:meth:`save_file` into ``directory`` as ``NAME.overlay``; returns the state
        :meth:`reopen` takes: ``{"v": 1, "file": "NAME.overlay", "size": bytes,
        "block_size": BLOCK_SIZE}``.

        Raises:
            OverlayStateError: ``name`` is not a plain file name.
            OSError: the file cannot be written.
        """
        fname = _check_name(f"{name}.overlay" if isinstance(name, str) else name,
                            "overlay name")
        self.save_file(os.path.join(os.fspath(directory), fname))
        return {"v": 1, "file": fname, "size": self.size, "block_size": BLOCK_SIZE}

    @classmethod
    def reopen(cls, base: DiskBackend, dirs: list[str], directory: str | os.PathLike,
               state: dict) -> "Overlay":
        """:meth:`open_file` of the file that ``state`` (from :meth:`save_to`) names in
        ``directory``, after checking ``state``.

        Raises:
            OverlayStateError: ``state`` is not one save_to returns, names a file
                outside ``directory``, or is for a disk of another size; or see
                :meth:`open_file`.
        """
        what = f"{base.path}: saved overlay"
        if not isinstance(state, dict) or state.get("v") != 1 \
                or set(state) != {"v", *_STATE_KEYS}:
            raise OverlayStateError(f"{what}: the state is not a version 1 overlay state")
        fname = _check_name(state["file"], f"{what}: file")
        size, block_size = state["size"], state["block_size"]
        if type(block_size) is not int or block_size != BLOCK_SIZE:
            raise OverlayStateError(f"{what}: block size {block_size!r}, not {BLOCK_SIZE}")
        if type(size) is not int or size != base.size:
            raise OverlayStateError(f"{what}: it is of a {size!r}-byte disk; the image now "
                                    f"has {base.size} bytes")
        return cls.open_file(base, dirs, os.path.join(os.fspath(directory), fname))

    @classmethod
    def open_file(cls, base: DiskBackend, dirs: list[str],
                  path: str | os.PathLike) -> "Overlay":
        """A new overlay over ``base`` holding what :meth:`save_file` wrote at ``path``:
        the saved blocks are copied into a new private unlinked overlay file (in one of
        ``dirs``); the saved file is only read.

        Raises:
            OverlayStateError: the file is missing, unreadable, not a saved overlay, of
                another block size or of a disk of another size than ``base`` (the base
                stays open: the caller closes it, as with the constructor).
            OverlayError: no overlay file could be created.
        """
        path = os.fspath(path)
        what = f"{base.path}: saved overlay {path}"
        size = base.size
        nblocks = -(-size // BLOCK_SIZE)
        map_len = -(-nblocks // 8)
        try:
            # O_NONBLOCK: a FIFO put in a snapshot must not hang the restore (it is
            # refused below); a regular file ignores the flag.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise OverlayStateError(f"{what}: cannot open it: {e.strerror}") from None
        try:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OverlayStateError(f"{what}: not a regular file")
                total = st.st_size
                trailer = os.pread(fd, _TRAILER.size, total - _TRAILER.size) \
                    if total >= _TRAILER.size else b""
                if len(trailer) != _TRAILER.size:
                    raise OverlayStateError(f"{what}: too short to be a saved overlay")
                magic, version, block_size, saved_size, _ = _TRAILER.unpack(trailer)
                if magic != _MAGIC or version != 1:
                    raise OverlayStateError(f"{what}: not a version 1 saved overlay")
                if block_size != BLOCK_SIZE or saved_size != size:
                    raise OverlayStateError(
                        f"{what}: of a {saved_size}-byte disk in {block_size}-byte "
                        f"blocks; the image has {size} bytes, in {BLOCK_SIZE}-byte blocks")
                if total != size + map_len + _TRAILER.size:
                    raise OverlayStateError(f"{what}: {total} bytes long, not "
                                            f"{size + map_len + _TRAILER.size}")
                bitmap = os.pread(fd, map_len, size)
                if len(bitmap) != map_len:
                    raise OverlayStateError(f"{what}: the block map is truncated")
                if nblocks & 7 and bitmap[-1] >> (nblocks & 7):
                    raise OverlayStateError(f"{what}: the block map marks blocks past "
                                            "the end of the disk")
            except OSError as e:
                raise OverlayStateError(f"{what}: cannot read it: {e.strerror}") from None
            overlay = cls(base, dirs)
            try:
                overlay.bitmap[:] = bitmap
                _copy_blocks(overlay.runs(0, nblocks), size, fd, overlay.fd)
            except BaseException as e:
                os.close(overlay.fd)  # not close(): the base is the caller's to close
                overlay.fd = -1
                if isinstance(e, OSError):
                    raise OverlayStateError(f"{what}: cannot copy it: {e.strerror}") \
                        from None
                raise
            return overlay
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the overlay file (the kernel frees it: it has no name), then the base."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.base.close()

    # -- the bitmap --------------------------------------------------------------------
    def present(self, block: int) -> bool:
        return bool(self.bitmap[block >> 3] >> (block & 7) & 1)

    def _mark(self, lo: int, hi: int) -> None:
        """Set the bits of blocks [lo, hi)."""
        bm = self.bitmap
        while lo < hi and lo & 7:
            bm[lo >> 3] |= 1 << (lo & 7)
            lo += 1
        if lo + 8 <= hi:  # whole bytes at once (a 4 GiB discard is 16 KiB of bitmap)
            bm[lo >> 3:hi >> 3] = b"\xff" * ((hi >> 3) - (lo >> 3))
            lo = hi & ~7
        while lo < hi:
            bm[lo >> 3] |= 1 << (lo & 7)
            lo += 1

    def runs(self, lo: int, hi: int):
        """Yield ``(start, end, in_overlay)`` for maximal runs of blocks in [lo, hi)."""
        bm = self.bitmap
        i = lo
        while i < hi:
            here = self.present(i)
            j = i + 1
            while j < hi and j & 7 and self.present(j) == here:
                j += 1
            if j < hi and not j & 7 and self.present(j) == here:
                # Skip whole bytes of 0x00 / 0xff, then finish bit by bit.
                chunk = bytes(bm[j >> 3:hi >> 3])
                j += 8 * (len(chunk) - len(chunk.lstrip(b"\xff" if here else b"\x00")))
                while j < hi and self.present(j) == here:
                    j += 1
            yield i, j, here
            i = j

    # -- I/O ---------------------------------------------------------------------------
    def readv(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        """Read ``sum(len(views))`` bytes at ``offset`` into ``views``; bytes read (less
        only at the end of the base). Raises OSError."""
        if nbytes < 0:
            nbytes = sum(len(v) for v in views)
        if nbytes == 0:
            return 0
        end = offset + nbytes
        total = 0
        for b0, b1, here in self.runs(offset >> BLOCK_SHIFT,
                                      ((end - 1) >> BLOCK_SHIFT) + 1):
            lo = max(offset, b0 << BLOCK_SHIFT)
            hi = min(end, b1 << BLOCK_SHIFT)
            part = _sub_views(views, lo - offset, hi - lo)
            if here:
                n = full_io(os.preadv, self.fd, part, lo, hi - lo)
            else:
                n = self.base.readv(part, lo, hi - lo)
            total += n
            if n != hi - lo:
                break
        return total

    def writev(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        """Write ``views`` at ``offset`` into the overlay; bytes written. Raises OSError."""
        if nbytes < 0:
            nbytes = sum(len(v) for v in views)
        if nbytes == 0:
            return 0
        self._copy_up_edges(offset, nbytes)
        n = full_io(os.pwritev, self.fd, views, offset, nbytes)
        if n == nbytes:
            self._mark(offset >> BLOCK_SHIFT, ((offset + nbytes - 1) >> BLOCK_SHIFT) + 1)
        return n

    def flush(self) -> None:
        """Nothing to do: nothing written to an overlay is meant to survive the VM."""

    def discard(self, offset: int, length: int) -> None:
        self.zero(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.zero(offset, length)  # the overlay's hole is freed either way

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros. Raises OSError."""
        if length <= 0:
            return
        self._copy_up_edges(offset, length)
        try:
            # Frees the overlay's space too; partial blocks at the edges are zeroed.
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in NO_FALLOCATE:
                raise
            write_zeros(self.fd, offset, length)
        self._mark(offset >> BLOCK_SHIFT, ((offset + length - 1) >> BLOCK_SHIFT) + 1)

    def _copy_up_edges(self, offset: int, length: int) -> None:
        """Copy the first and last block of [offset, offset+length) into the overlay if
        the range covers them only partly and they are still in the base."""
        end = offset + length
        first, last = offset >> BLOCK_SHIFT, (end - 1) >> BLOCK_SHIFT
        if offset & (BLOCK_SIZE - 1):
            self._copy_up(first)
        if end < min((last + 1) << BLOCK_SHIFT, self.size):
            self._copy_up(last)

    def _copy_up(self, block: int) -> None:
        if self.present(block):
            return
        start = block << BLOCK_SHIFT
        n = min(BLOCK_SIZE, self.size - start)
        data = bytearray(n)  # one block: small enough to hold
        if self.base.readv([memoryview(data)], start, n) != n:
            raise OSError(errno.EIO, "base image shrank")
        if os.pwrite(self.fd, data, start) != n:
            raise OSError(errno.EIO, "short write to the overlay")
        self._mark(block, block + 1)


def _sub_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """Views of bytes [start, start+length) of the concatenation of ``views``."""
    out = []
    pos = 0
    end = start + length
    for v in views:
        n = len(v)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append(v[lo - pos:hi - pos])
        pos += n
        if pos >= end:
            break
    return out

