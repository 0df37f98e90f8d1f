"""The on-disk snapshot format: a directory holding the VM's state and its RAM.

::

    DIR/state.json   the state: versioned, checksummed JSON (layout below)
    DIR/memory       guest RAM, exactly the RAM size, sparse (zero pages are holes)
    DIR/<name>       files other parts wrote (e.g. disk overlays), each recorded in
                     state.json with its size and sha256

state.json (keys sorted; ``sha256`` covers everything else)::

    {"format": "pyvmm-snapshot", "version": 1,
     "created": "2026-12-01T04:19:00Z",
     "deps": {"cpu_profile": "safe", ...},   # what a restoring VM must match
     "memory": {"size": 268435456,           # bytes of RAM = the memory file's size
                "stored": 20971520,          # bytes of non-zero pages written
                "extents": 812,              # data extents (SEEK_DATA/SEEK_HOLE) ...
                "sha256_extents": "..."},    # ... and the sha256 of their list
     "files": {"disk0.overlay": {"size": 1048576, "sha256": "..."}},
     "state": {...},                         # the caller's state; bytes as {"$b64": "..."}
     "sha256": "..."}                        # of the canonical JSON of all the rest

What is checked when a snapshot is read (:func:`read_snapshot`), before the caller
builds anything from it: the directory and state.json exist; the JSON parses; the
format is this one and its version not newer; the checksum matches; the memory file
has exactly the recorded size and the same data extents; every extra file has its
recorded size and sha256; the dependencies the caller names match.

The memory's *content* is deliberately not hashed: restoring maps the file and loads a
page only when the guest touches it, so restore time does not grow with RAM, and
reading (let alone hashing) the whole file would undo that. Instead the file's data
extents are recorded at save time and compared at restore, which is cheap (two lseeks
per extent) and catches a file truncated and extended again, or replaced by another
file of the same size. It does not catch bytes overwritten in place. A snapshot copied
elsewhere must keep its holes: ``cp`` (which copies a sparse file's extents), ``cp
--sparse=always``, ``tar -S`` and ``rsync -S`` do on a filesystem of the same block
size (the file's holes are exactly its zero 4 KiB pages); ``cp --sparse=never`` does not
and the copy is refused.

State data is plain: None, bool, int, finite float, str, bytes (stored as base64 in a
``{"$b64": ...}`` object), lists, and dicts with str keys (a key ``"$b64"`` is reserved).
Anything else (a tuple, an object, NaN) is refused when written, with a TypeError
naming where in the state it is. Only json reads the file: nothing in a snapshot can
run code when loaded.

``deps``: a flat dict of str -> JSON value (usually a str or int) describing what a VM
restoring this snapshot must have in common with the one that saved it (CPU profile,
host quirks, RAM size, vCPU count, ...). It is stored as given; ``read_snapshot(...,
expect_deps=...)`` compares the keys the caller names.
"""

from __future__ import annotations

import binascii
import errno
import json
import math
import os
import re
import time
from collections import namedtuple

from vmm.errors import UserError
from vmm.paths import sha256

FORMAT = "pyvmm-snapshot"
#: The format version this pyvmm writes and the newest it reads.
VERSION = 1
STATE_FILE = "state.json"
MEMORY_FILE = "memory"

#: A state.json larger than this is refused unread (a real one is a few hundred KiB).
MAX_STATE_BYTES = 64 << 20
#: Names of the extra files: plain names in the snapshot directory, no dot first.
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_B64 = "$b64"
#: O_NONBLOCK: a FIFO put where a file should be fails the regular-file check instead of
#: hanging the open (it changes nothing for a regular file).
_O_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
_HASH_CHUNK = 1 << 20


class SnapshotError(UserError):
    """A snapshot that cannot be written or read, or that does not fit this VM."""


class SnapshotInfo(namedtuple("SnapshotInfo", "directory memory_size memory_stored "
                                              "state_bytes files_bytes memory_s files_s total_s")):
    """What :func:`write_snapshot` wrote: the directory; RAM size and bytes stored of it;
    bytes of state.json; bytes of the extra files; seconds spent saving the memory, the
    extra files, and in all."""

    __slots__ = ()


class Snapshot:
    """A snapshot directory that :func:`read_snapshot` checked.

    Attributes:
        directory: the snapshot directory.
        state: the state as written (bytes values are bytes again).
        deps: the dependencies recorded with it.
        memory_path: the guest RAM file (for :meth:`GuestMemory.from_file`).
        memory_size: the RAM size in bytes (the file's size).
        memory_stored: bytes of non-zero RAM the file holds.
        files: ``{name: size}`` of the extra files.
        created: when it was written (ISO 8601, UTC).
        version: its format version.
    """

    __slots__ = ("directory", "state", "deps", "memory_path", "memory_size",
                 "memory_stored", "files", "created", "version")

    def __init__(self, directory: str, doc: dict):
        self.directory = directory
        self.version = doc["version"]
        self.created = doc["created"]
        self.deps = doc["deps"]
        self.memory_path = os.path.join(directory, MEMORY_FILE)
        self.memory_size = doc["memory"]["size"]
        self.memory_stored = doc["memory"]["stored"]
        self.files = {name: rec["size"] for name, rec in doc["files"].items()}
        self.state = doc["state"]

    def path(self, name: str) -> str:
        """The full path of the extra file ``name`` (one that write_snapshot's ``files``
        wrote); SnapshotError if the snapshot has none by that name."""
        if name not in self.files:
            raise SnapshotError(f"snapshot {self.directory} has no file {name!r}")
        return os.path.join(self.directory, name)


# -- plain data <-> JSON ----------------------------------------------------------------

def _encode(value, where: str):
    """``value`` as JSON data (bytes as {"$b64": ...}); TypeError naming ``where``."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return {_B64: binascii.b2a_base64(value, newline=False).decode("ascii")}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where} is {value!r}: not snapshot data (JSON has no NaN or infinity)")
        return float(value)
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r}: snapshot data has str keys only")
            if k == _B64:
                raise TypeError(f"{where} has the key {_B64!r}, which snapshot data reserves for bytes")
            out[str(k)] = _encode(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where} is a {type(value).__name__}: not snapshot data "
                    "(None, bool, int, float, str, bytes, list, dict with str keys)")


def _decode(value):
    """Inverse of :func:`_encode` (ValueError on a malformed bytes object)."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if _B64 in value:
            b64 = value[_B64]
            if len(value) != 1 or not isinstance(b64, str):
                raise ValueError("malformed bytes value")
            return binascii.a2b_base64(b64)
        return {k: _decode(v) for k, v in value.items()}
    return value


def _canonical(doc: dict) -> bytes:
    """The bytes the checksum covers: ``doc`` less its ``sha256``, keys sorted, compact."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


# -- files ----------------------------------------------------------------------------

def data_extents(path: str) -> list[tuple[int, int]]:
    """The data extents ``[(start, end), ...]`` of a file, by SEEK_DATA/SEEK_HOLE.

    A filesystem without hole support reports the whole file as one extent (the kernel's
    generic lseek does), as does one whose lseek refuses SEEK_DATA.
    """
    fd = os.open(path, _O_READ)
    try:
        size = os.fstat(fd).st_size
        extents, off = [], 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:       # no data after off: the rest is a hole
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    return [(0, size)]
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            off = end
        return extents
    finally:
        os.close(fd)


def _extents_digest(extents: list[tuple[int, int]]) -> str:
    return sha256(";".join(f"{s}-{e}" for s, e in extents).encode("ascii")).hexdigest()


def _sha256_and_fsync(path: str, *, sync: bool) -> tuple[int, str]:
    """(size, sha256 hex) of a regular file; fsynced first when ``sync``."""
    fd = os.open(path, _O_READ)
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise SnapshotError(f"{path} is not a regular file")
        if sync:
            os.fsync(fd)
        h = sha256()
        while True:
            chunk = os.read(fd, _HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
        return st.st_size, h.hexdigest()
    finally:
        os.close(fd)


def _is_regular(mode: int) -> bool:
    import stat
    return stat.S_ISREG(mode)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


# -- writing ----------------------------------------------------------------------------

def write_snapshot(directory: str, *, state: dict, memory, deps: dict,
                   files: dict | None = None) -> SnapshotInfo:
    """Write a snapshot directory atomically.

    Everything is built in a temporary sibling directory (``DIR.tmp-<pid>-<random>``),
    each file and that directory fsynced, and then renamed to ``directory`` (and the
    parent fsynced). On any failure the temporary directory is removed: a snapshot is
    either complete or absent. The vCPUs must be paused meanwhile.

    Args:
        directory: where the snapshot goes; it must not exist, or be an empty directory.
        state: the VM's state as plain data (see the module docstring).
        memory: the GuestMemory to save (written sparse, see GuestMemory.save_to).
        deps: a flat dict of str -> JSON value that a restoring VM must match.
        files: ``{name: write}`` for extra files: ``write(path)`` is called with the
            full path in the temporary directory and must create a regular file there;
            its size and sha256 are recorded.
    Returns:
        A SnapshotInfo (bytes written and the time taken).
    Raises:
        SnapshotError: the directory exists and is not empty, a file name is unusable,
            or the snapshot cannot be written.
        TypeError: ``state`` or ``deps`` holds something that is not plain data
            (the message names where).
        Whatever a ``files`` callable raises (the temporary directory is removed).
    """
    t0 = time.perf_counter()
    directory = os.path.normpath(directory)
    files = files or {}
    for name in files:
        if not isinstance(name, str) or not _FILE_NAME_RE.match(name) or name in (STATE_FILE, MEMORY_FILE):
            raise SnapshotError(f"snapshot file name {name!r} is unusable (a plain name other than "
                                f"{STATE_FILE} and {MEMORY_FILE})")
    if not isinstance(deps, dict):
        raise TypeError(f"deps is a {type(deps).__name__}, not a dict")
    encoded_state = _encode(state, "state")
    encoded_deps = _encode(deps, "deps")
    _refuse_existing(directory)

    tmp = f"{directory}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.mkdir(tmp, 0o700)
    except FileNotFoundError:
        raise SnapshotError(f"cannot create snapshot {directory}: "
                            f"{os.path.dirname(directory) or '.'} does not exist") from None
    except OSError as e:
        raise SnapshotError(f"cannot create snapshot {directory}: {e.strerror}") from None
    try:
        try:
            t1 = time.perf_counter()
            stored = memory.save_to(os.path.join(tmp, MEMORY_FILE))
            extents = data_extents(os.path.join(tmp, MEMORY_FILE))
            t2 = time.perf_counter()
            file_records, files_bytes = {}, 0
            for name, write in files.items():
                path = os.path.join(tmp, name)
                write(path)
                if not os.path.exists(path):
                    raise SnapshotError(f"snapshot file {name!r} was not written")
                size, digest = _sha256_and_fsync(path, sync=True)
                file_records[name] = {"size": size, "sha256": digest}
                files_bytes += size
            t3 = time.perf_counter()
            doc = {
                "format": FORMAT,
                "version": VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "deps": encoded_deps,
                "memory": {"size": memory.size, "stored": stored, "extents": len(extents),
                           "sha256_extents": _extents_digest(extents)},
                "files": file_records,
                "state": encoded_state,
            }
            doc["sha256"] = sha256(_canonical(doc)).hexdigest()
            text = json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=True,
                              allow_nan=False).encode("ascii") + b"\n"
            fd = os.open(os.path.join(tmp, STATE_FILE),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(tmp)
            try:
                os.rename(tmp, directory)    # replaces an empty directory, nothing else
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise SnapshotError(_exists_message(directory)) from None
                raise
            _fsync_dir(os.path.dirname(directory) or ".")
        except UserError as e:              # GuestMemoryError from save_to, ours, others'
            if isinstance(e, SnapshotError):
                raise
            raise SnapshotError(f"cannot write snapshot {directory}: {e}") from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise SnapshotError(f"cannot write snapshot {directory}{where}: {e.strerror or e}") from None
    except BaseException:
        _remove_tree(tmp)
        raise
    t4 = time.perf_counter()
    return SnapshotInfo(directory, memory.size, stored, len(text), files_bytes,
                        t2 - t1, t3 - t2, t4 - t0)


def _exists_message(directory: str) -> str:
    return f"{directory} exists; remove it or choose another directory"


def _refuse_existing(directory: str) -> None:
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise SnapshotError(_exists_message(directory)) from None
    except OSError as e:
        raise SnapshotError(f"cannot write snapshot {directory}: {e.strerror}") from None
    if entries:
        raise SnapshotError(_exists_message(directory))


# -- reading ----------------------------------------------------------------------------

def read_snapshot(directory: str, *, expect_deps: dict | None = None) -> Snapshot:
    """Read and check a snapshot directory (what is checked: the module docstring).

    Args:
        directory: the snapshot directory.
        expect_deps: dependencies this VM has; each key must equal the recorded value.
    Returns:
        A Snapshot (its memory is not read: map it with GuestMemory.from_file).
    Raises:
        SnapshotError: the snapshot is missing, damaged, newer than this pyvmm, or
            made for a different VM (one line naming the first difference).
    """
    directory = os.path.normpath(directory)
    doc = _load_state(directory)
    snap = f"snapshot {directory}"
    if expect_deps:
        recorded = doc["deps"]
        for key, want in expect_deps.items():
            want_json = _encode(want, f"expect_deps[{key!r}]")
            if key not in recorded:
                raise SnapshotError(f"{snap} records no {key}; this VM has {want!r}")
            if recorded[key] != want_json:
                raise SnapshotError(f"{snap} was made with {key} {_decode(recorded[key])!r}; "
                                    f"this VM has {want!r}")
    _check_memory(directory, doc["memory"])
    for name, rec in doc["files"].items():
        path = os.path.join(directory, name)
        try:
            size, digest = _sha256_and_fsync(path, sync=False)
        except FileNotFoundError:
            raise SnapshotError(f"{path} is missing") from None
        except OSError as e:
            raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
        if size != rec["size"]:
            raise SnapshotError(f"{path} has {size} bytes; the snapshot recorded {rec['size']}")
        if digest != rec["sha256"]:
            raise SnapshotError(f"{path} is corrupted (sha256 mismatch)")
    doc["deps"] = {k: _decode(v) for k, v in doc["deps"].items()}
    doc["state"] = _decode(doc["state"])
    return Snapshot(directory, doc)


def _load_state(directory: str) -> dict:
    """state.json parsed and checked: format, version, checksum, structure."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise SnapshotError(f"snapshot {directory} {what}")
    try:
        fd = os.open(path, _O_READ)
        try:
            if not _is_regular(os.fstat(fd).st_mode):
                raise SnapshotError(f"{path} is not a regular file")
            with open(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise SnapshotError(f"{directory} is not a pyvmm snapshot (it has no {STATE_FILE})") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise SnapshotError(f"{path} is larger than {MAX_STATE_BYTES >> 20} MiB; not a pyvmm snapshot")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SnapshotError(f"{path} is corrupted (not valid JSON: {reason})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a pyvmm snapshot's state")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SnapshotError(f"{path} has an unknown format version {version!r}")
    if version > VERSION:
        raise SnapshotError(f"snapshot {directory} was written by a newer pyvmm (format {version}); "
                            f"this one reads format {VERSION}")
    if not isinstance(doc.get("sha256"), str) or sha256(_canonical(doc)).hexdigest() != doc["sha256"]:
        raise SnapshotError(f"{path} is corrupted (checksum mismatch)")
    try:
        _check_structure(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{path} is malformed ({e})") from None
    return doc


def _check_structure(doc: dict) -> None:
    """Types of the fields this module reads (a checksummed file can still be forged)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(what)

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    need(isinstance(doc.get("created"), str), "created")
    need(isinstance(doc.get("deps"), dict), "deps")
    mem = doc.get("memory")
    need(isinstance(mem, dict), "memory")
    for key in ("size", "stored", "extents"):
        need(is_int(mem.get(key)), f"memory.{key}")
    need(isinstance(mem.get("sha256_extents"), str), "memory.sha256_extents")
    files = doc.get("files")
    need(isinstance(files, dict), "files")
    for name, rec in files.items():
        need(bool(_FILE_NAME_RE.match(name)) and name not in (STATE_FILE, MEMORY_FILE),
             f"files: name {name!r}")
        need(isinstance(rec, dict) and is_int(rec.get("size")) and isinstance(rec.get("sha256"), str),
             f"files[{name!r}]")
    need("state" in doc, "state")
    _decode(doc["state"])                   # malformed bytes objects raise ValueError here
    _decode(doc["deps"])


def _check_memory(directory: str, rec: dict) -> None:
    path = os.path.join(directory, MEMORY_FILE)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SnapshotError(f"{path} is missing") from None
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    if not _is_regular(st.st_mode):
        raise SnapshotError(f"{path} is not a regular file")
    if st.st_size < rec["size"]:
        raise SnapshotError(f"{path} is truncated ({st.st_size} of {rec['size']} bytes)")
    if st.st_size != rec["size"]:
        raise SnapshotError(f"{path} has {st.st_size} bytes; the snapshot recorded {rec['size']}")
    try:
        extents = data_extents(path)
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
    if len(extents) != rec["extents"] or _extents_digest(extents) != rec["sha256_extents"]:
        raise SnapshotError(
            f"{path} is not the file that was saved (data extents differ: {rec['extents']} recorded, "
            f"{len(extents)} found); was it replaced, or copied without keeping its holes?")
