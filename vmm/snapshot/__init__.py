"""Snapshots: a paused VM's state and RAM in a directory (the format: vmm/snapshot/format.py).

Importing this package imports json and hashlib: import it only when a snapshot is
written or read, not on the boot path.
"""

from vmm.snapshot.format import (FORMAT, MEMORY_FILE, STATE_FILE, VERSION, Snapshot,
                                 SnapshotError, SnapshotInfo, data_extents, read_snapshot,
                                 write_snapshot)

__all__ = ["FORMAT", "MEMORY_FILE", "STATE_FILE", "VERSION", "Snapshot", "SnapshotError",
           "SnapshotInfo", "data_extents", "read_snapshot", "write_snapshot"]
