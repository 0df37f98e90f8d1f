"""Disk backends behind one interface, below the device models that use them.

As in kvmtool's ``disk/`` and Firecracker's ``devices/virtio/block/virtio/io/``: a
device model (vmm/devices/virtio/blk.py) speaks its protocol and calls a
:class:`DiskBackend` for the data; the backend knows files, not virtio.

* :class:`~vmm.disk.raw.RawDisk` (raw.py): a raw image file or block device.
* :class:`~vmm.disk.overlay.Overlay` (overlay.py): a throwaway copy-on-write layer over
  another backend, for snapshot disks.

The interface (methods, locking, thread-safety) is documented on
:class:`~vmm.disk.base.DiskBackend`. Nothing here imports ``vmm.devices``.
"""

from __future__ import annotations

import os

from .base import CACHE_MODES, DiskBackend, DiskError
from .raw import RawDisk

__all__ = ["CACHE_MODES", "DiskBackend", "DiskError", "RawDisk", "open_disk"]


def open_disk(path: str | os.PathLike, *, read_only: bool = False,
              cache: str = "writeback", snapshot: bool = False,
              overlay_from: tuple[str | os.PathLike, dict] | None = None,
              overlay_file: str | os.PathLike | None = None) -> DiskBackend:
    """Open a disk image for a VM.

    Args:
        path: a raw image (regular file) or a block device.
        read_only: open it read-only (shared lock); writes are refused.
        cache: ``writeback``, ``none`` or ``unsafe`` (see raw.py).
        snapshot: keep the image unmodified: it is opened read-only (shared lock, so
            several snapshot or read-only VMs may share it and read-write VMs are kept
            off) and the guest's writes go to a copy-on-write overlay (overlay.py) that
            is an unlinked temporary file, gone with the VM, also on SIGKILL. With
            ``read_only`` it changes nothing: a read-only disk needs no overlay.
        overlay_from: ``(directory, state)``: start the overlay of a snapshot disk with
            what ``Overlay.save_to`` saved in ``directory`` (its returned ``state``),
            copied into the new overlay (overlay.py ``Overlay.reopen``); the saved files
            are only read. Needs ``snapshot`` and not ``read_only``.
        overlay_file: the same from a file ``Overlay.save_file`` wrote (self-describing;
            ``Overlay.open_file``).
    Returns:
        The backend; the caller closes it (``close`` or ``with``).
    Raises:
        DiskError: see :class:`RawDisk`; or no overlay file could be created; or
            ``overlay_from`` cannot be used (``overlay.OverlayStateError``, also a
            ValueError).
    """
    if (overlay_from is not None or overlay_file is not None) and (not snapshot or read_only):
        raise DiskError(f"{os.fspath(path)}: a saved overlay needs a snapshot disk "
                        "that is not read-only")
    if not snapshot or read_only:
        return RawDisk(path, read_only=read_only, cache=cache)
    from . import overlay  # tempfile & co.: only for snapshot disks
    base = RawDisk(path, read_only=True, cache=cache)
    try:
        if overlay_file is not None:
            return overlay.Overlay.open_file(base, overlay.overlay_dirs(base.path),
                                             overlay_file)
        if overlay_from is not None:
            directory, state = overlay_from
            return overlay.Overlay.reopen(base, overlay.overlay_dirs(base.path), directory,
                                          state)
        return overlay.Overlay(base, overlay.overlay_dirs(base.path))
    except BaseException:
        base.close()
        raise
