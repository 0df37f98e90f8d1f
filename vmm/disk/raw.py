"""A raw disk image: a regular file or a block device, byte for byte what the guest sees.

Data moves with ``os.preadv``/``os.pwritev`` straight between the image and the
caller's buffers (views of guest memory); no data is copied through Python objects.

Cache modes (``cache=``):

* ``writeback`` (default): ``flush`` calls ``fdatasync``.
* ``none``: the same semantics here. O_DIRECT is deliberately not used: it needs
  sector-aligned host buffers and guest buffers are not necessarily aligned (nor does
  every filesystem, tmpfs for one, accept it); the guest's FLUSH still makes data
  durable.
* ``unsafe``: ``flush`` returns at once without syncing (for throwaway test disks).

Discard punches a hole where the filesystem can (otherwise nothing: it is a hint), so a
discarded range reads as zeros or as before. Write-zeroes uses FALLOC_FL_ZERO_RANGE, or
PUNCH_HOLE when asked to unmap, and writes zeros where the filesystem has neither.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from vmm.log import get_logger

from .base import (CACHE_MODES, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                   FALLOC_FL_ZERO_RANGE, NO_FALLOCATE, DiskBackend, DiskError, fallocate,
                   full_io, write_zeros)

log = get_logger(__name__)

#: F_OFD_SETLK (Linux 3.15+); Python's fcntl exports it from 3.9 on Linux.
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def ofd_lock(fd: int, path: str, exclusive: bool) -> None:
    """Lock the whole image with an open-file-description lock.

    OFD locks belong to the open file, not the process: they are not lost when another
    fd on the same file is closed, and they conflict between two opens in one process
    too (two VMs in one test process still exclude each other).

    Raises:
        DiskError: another open file holds a conflicting lock.
    """
    l_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
    # pid_t l_pid (must be 0 for OFD locks); native alignment pads it to 32 bytes.
    arg = struct.pack("hhqqi4x", l_type, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, arg)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise DiskError(f"{path} is in use by another VM") from None
        # EINVAL / ENOLCK / EOPNOTSUPP: the kernel or filesystem has no OFD locks.
        log.warning("cannot lock %s (%s); make sure no other VM uses it", path, e.strerror)


class RawDisk(DiskBackend):
    """A raw image file or block device, opened and locked.

    Args:
        path: a regular file or a block device.
        read_only: open read-only (shared lock); otherwise read-write (exclusive lock).
        cache: ``writeback``, ``none`` or ``unsafe`` (see the module docstring).
    Raises:
        DiskError: the image is missing, a directory, not a file or block device,
            unreadable (or unwritable when ``read_only`` is false), locked by another VM,
            or ``cache`` is unknown.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False,
                 cache: str = "writeback"):
        path = os.fspath(path)
        if cache not in CACHE_MODES:
            raise DiskError(f"unknown cache mode {cache!r} (use {', '.join(CACHE_MODES)})")
        self.path = path
        self.read_only = read_only
        self.cache = cache
        self.fd = -1
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DiskError(f"disk image {path} does not exist") from None
        except OSError as e:
            raise DiskError(f"cannot open disk image {path}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise DiskError(f"{path} is a directory, not a disk image")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskError(f"{path} is not a regular file or block device")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except PermissionError:
            how = "reading" if read_only else "writing (use a read-only disk?)"
            raise DiskError(f"cannot open disk image {path} for {how}: permission denied") \
                from None
        except OSError as e:
            raise DiskError(f"cannot open disk image {path}: {e.strerror}") from None
        try:
            ofd_lock(fd, path, exclusive=not read_only)
            # A block device's size too: lseek to its end works for both.
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.identity = f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}"
        self.supports_discard = self.supports_write_zeroes = not read_only

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- I/O ---------------------------------------------------------------------------
    def readv(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        return full_io(os.preadv, self.fd, views, offset, nbytes)

    def writev(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        return full_io(os.pwritev, self.fd, views, offset, nbytes)

    def flush(self) -> None:
        if self.cache != "unsafe":
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        self._punch(offset, length, required=False)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        if unmap:
            self._punch(offset, length, required=True)
        else:
            self._zero(offset, length)

    def _punch(self, offset: int, length: int, *, required: bool) -> None:
        """Deallocate a range; reads of it return zeros afterwards. Where the filesystem
        cannot punch holes: zero it if ``required``, else leave it (a discard is a hint)."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in NO_FALLOCATE:
                raise
            if required:
                self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in NO_FALLOCATE:
                raise
        write_zeros(self.fd, offset, length)
