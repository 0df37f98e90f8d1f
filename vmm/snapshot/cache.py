"""The cache of "booted, agent ready" snapshots that disposable guests start from.

``pyvmm run``, ``vmm.Guest`` and the pytest plugin boot a guest once per shape and keep
a snapshot of it taken the moment its agent said READY; later guests of the same shape
are restored from it instead of booting (milliseconds instead of ~45 s on an
emulation-only host). A shape is everything that makes the booted guest what it is:
the kernel and initramfs files (path, size, mtime, inode), guest RAM, vCPUs, the kernel
command line (which carries the CPU profile's options), the host quirks and pyvmm's
version; the snapshot's own dependency check (vmm.snapshot.persist) still runs on
every restore. Disks are not part of a shape: guests are saved with empty drives, and
a guest's disks are inserted after the restore (vmm/disk/empty.py, vmm/guest.py).

Layout: ``<cache>/snapshots/<key>/`` — one snapshot directory each, written atomically
by vmm.snapshot.format (a second process filling the same key at the same time loses
the race harmlessly), plus ``<key>.used`` stamps for least-recently-used eviction.
The cache is bounded: ``$PYVMM_SNAPSHOT_CACHE_MAX`` bytes on disk (default 2 GiB),
checked after each new snapshot. ``$PYVMM_SNAPSHOT_CACHE=0`` turns it off;
``$PYVMM_SNAPSHOT_CACHE_DIR`` puts it elsewhere.
"""

from __future__ import annotations

import os
import time

from vmm import __version__
from vmm.paths import cache_dir, sha256

DEFAULT_MAX_BYTES = 2 << 30


def enabled() -> bool:
    """False when ``$PYVMM_SNAPSHOT_CACHE`` is 0/no/off."""
    return os.environ.get("PYVMM_SNAPSHOT_CACHE", "1").lower() not in ("0", "no", "off", "false")


def root() -> str:
    """``$PYVMM_SNAPSHOT_CACHE_DIR``, else ``<cache>/snapshots`` (tests and benchmarks
    point the first at a directory of their own: a cold cache without moving the
    kernel build cache)."""
    return os.environ.get("PYVMM_SNAPSHOT_CACHE_DIR") or os.path.join(cache_dir(), "snapshots")


def max_bytes() -> int:
    try:
        return int(os.environ.get("PYVMM_SNAPSHOT_CACHE_MAX", DEFAULT_MAX_BYTES))
    except ValueError:
        return DEFAULT_MAX_BYTES


def _file_id(path) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino]


def key(*, kernel, initrd, mem_size: int, cpus: int, cmdline: str, quirks, loop: str = "") -> str:
    """The cache key of a guest's shape (see the module docstring)."""
    shape = repr([__version__, _file_id(kernel), _file_id(initrd), mem_size, cpus, cmdline,
                  bool(quirks.complete_int3), bool(quirks.complete_fwait)])
    return sha256(shape.encode()).hexdigest()[:24]


def lookup(k: str) -> str | None:
    """The snapshot directory for key ``k`` if one is stored (marked as used)."""
    d = os.path.join(root(), k)
    if not os.path.isfile(os.path.join(d, "state.json")):
        return None
    _touch(k)
    return d


def path_for(k: str) -> str:
    """Where a new snapshot for key ``k`` goes (its parent is created)."""
    os.makedirs(root(), exist_ok=True)
    return os.path.join(root(), k)


def _touch(k: str) -> None:
    stamp = os.path.join(root(), f"{k}.used")
    try:
        with open(stamp, "a"):
            pass
        os.utime(stamp)
    except OSError:
        pass


def stored(k: str) -> None:
    """Call after a snapshot for ``k`` was written: mark it used and keep the bound."""
    _touch(k)
    evict(max_bytes())


def _disk_usage(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def entries() -> list[dict]:
    """Every stored snapshot: key, directory, bytes on disk, last use (epoch seconds)."""
    out = []
    try:
        names = os.listdir(root())
    except OSError:
        return out
    for name in names:
        d = os.path.join(root(), name)
        if ".tmp-" in name or not os.path.isfile(os.path.join(d, "state.json")):
            continue
        try:
            used = os.stat(os.path.join(root(), f"{name}.used")).st_mtime
        except OSError:
            used = os.stat(d).st_mtime
        out.append({"key": name, "directory": d, "bytes": _disk_usage(d), "used": used})
    return sorted(out, key=lambda e: e["used"], reverse=True)


def remove(k: str) -> None:
    """Remove one snapshot: renamed aside first, so a reader never sees half of it (a
    guest restored from it keeps its memory mapping: the file stays until unmapped)."""
    d = os.path.join(root(), k)
    aside = f"{d}.tmp-rm-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(d, aside)
    except OSError:
        return
    import shutil
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.unlink(os.path.join(root(), f"{k}.used"))
    except OSError:
        pass


def evict(limit: int) -> list[str]:
    """Remove least recently used snapshots until the cache holds at most ``limit``
    bytes; returns the keys removed."""
    removed, total = [], 0
    for e in entries():                 # most recently used first
        total += e["bytes"]
        if total > limit:
            remove(e["key"])
            removed.append(e["key"])
    return removed


def clear() -> int:
    """Remove every snapshot; returns how many."""
    n = 0
    for e in entries():
        remove(e["key"])
        n += 1
    return n
