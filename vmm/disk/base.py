"""The disk backend interface, and the file I/O helpers both backends share.

Kept apart from ``vmm/disk/__init__.py`` so that raw.py and overlay.py import it without
importing the package that imports them (README "Habits" 11: no import cycles).
"""

from __future__ import annotations

import ctypes
import errno
import os

from vmm.errors import UserError


class DiskError(UserError):
    """A disk image pyvmm cannot use (one line, meant for the user)."""


#: Cache modes (see raw.py): what a FLUSH does.
CACHE_MODES = ("writeback", "none", "unsafe")


class DiskBackend:
    """What a disk device model needs from a disk: bytes at offsets, nothing virtio.

    Offsets and lengths are in bytes. A caller (virtio-blk) checks that requests lie
    inside ``size`` and are whole sectors; a backend does not repeat those checks. Every
    I/O method raises ``OSError`` on a host I/O error; the caller turns it into a status.

    Attributes:
        path: the image, for messages.
        size: bytes the guest sees.
        read_only: every write, discard and write-zeroes raises ``OSError(EROFS)``.
        identity: a stable string naming the image on this host (device and inode
            numbers, hex); a device derives a default serial from it.
        supports_discard, supports_write_zeroes: whether ``discard`` / ``write_zeroes``
            may be called (a device offers the matching feature bits only then).

    The image lock: a backend holds an open-file-description lock on its image from
    open to ``close``: exclusive when it may write the image, shared when it only reads
    it. Opening an image another VM holds in a conflicting way raises ``DiskError``
    ("PATH is in use by another VM").

    Thread-safety: none. A device calls its backend from one thread at a time (the
    VMM's I/O thread, under the transport's lock).
    """

    path: str = ""
    size: int = 0
    read_only: bool = False
    identity: str = ""
    supports_discard: bool = False
    supports_write_zeroes: bool = False

    def readv(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        """Fill ``views`` in order from ``offset``; returns the bytes read (fewer only
        where the image ends). ``nbytes`` is the total of the views when the caller has
        summed them already (-1: not known)."""
        raise NotImplementedError

    def writev(self, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
        """Write ``views`` in order at ``offset``; returns the bytes written."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every completed write durable (as far as the cache mode promises)."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """The range's contents are no longer needed (a hint: space may be freed).
        Afterwards the range reads as zeros or as before, as the backend documents."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros; with ``unmap``, free its space if possible."""
        raise NotImplementedError

    def save_to(self, directory: str, name: str) -> dict | None:
        """For a snapshot: write what this backend holds outside its image into
        ``directory`` (files named from ``name``) and return the plain-data state that
        reopens it (overlay.py), or None when all its data is in the image (raw.py: the
        machine records the image itself as a dependency of the snapshot)."""
        return None

    def close(self) -> None:
        """Close the image (dropping its lock). Idempotent."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- file I/O helpers ----------------------------------------------------------------
# os.posix_fallocate() cannot pass mode flags, and discard / write-zeroes need
# FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE, so we call libc's fallocate directly.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (Linux)
_libc_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_libc_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc_fallocate.restype = ctypes.c_int

#: errnos of fallocate that mean "this filesystem cannot", not "this failed".
NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags. Raises OSError."""
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def full_io(func, fd: int, views: list[memoryview], offset: int, nbytes: int = -1) -> int:
    """Run preadv/pwritev until all of ``views`` is transferred or EOF; bytes moved.

    ``nbytes``, when the caller knows it, is the total of ``views``: a transfer done in
    one call (the usual case) then returns without the bookkeeping.
    """
    total = 0
    while views:
        n = func(fd, views, offset)
        if n <= 0:
            break
        total += n
        if total == nbytes:
            break
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:]] + views[1:]
    return total


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (where fallocate cannot). Raises OSError."""
    chunk = memoryview(bytes(min(length, 1 << 20)))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, chunk[:min(len(chunk), end - offset)], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
