"""A drive with no medium: the empty slot a disk is inserted into after the guest booted.

Disposable guests are saved in the snapshot cache (vmm/snapshot/cache.py) with a few
empty virtio-blk drives, so that one "booted, agent ready" snapshot serves every run:
after a restore the run's disks (root filesystem, --copy-in images, the scratch disk)
are inserted into those drives (``VirtioBlk.insert``, ``Machine.insert_disk``) and the
guest is told with a configuration-change interrupt (virtio 1.2 §4.2.2; Linux's
virtio_blk then re-reads the capacity, §5.2.4).

An empty drive has capacity 0, so a driver has no sector it may ask for; a request that
comes anyway fails with ENOMEDIUM, which virtio-blk turns into VIRTIO_BLK_S_IOERR.
"""

from __future__ import annotations

import errno

from .base import DiskBackend

#: What an empty drive's ``path`` reads in messages.
EMPTY_PATH = "(empty drive)"


class EmptyDisk(DiskBackend):
    """No medium: size 0, every data request fails with ENOMEDIUM; holds no file."""

    path = EMPTY_PATH
    size = 0
    read_only = False
    identity = ""

    @staticmethod
    def _no_medium():
        return OSError(errno.ENOMEDIUM, "no medium in the drive")

    def readv(self, views, offset, nbytes=-1):
        raise self._no_medium()

    def writev(self, views, offset, nbytes=-1):
        raise self._no_medium()

    def flush(self) -> None:
        pass    # nothing was written, nothing to make durable

    def discard(self, offset, length):
        raise self._no_medium()

    def write_zeroes(self, offset, length, unmap):
        raise self._no_medium()

    def close(self) -> None:
        pass
