"""The local image store: per user, content-addressed by manifest digest, with a tag index.

Layout (under ``$XDG_DATA_HOME/pyvmm/images``, default ``~/.local/share/pyvmm/images``;
``PYVMM_IMAGE_STORE`` overrides it)::

    index.json             {"version": 1, "tags": {NAME: "sha256:HEX"}}
    sha256-HEX/            one image, named by the digest of its OCI manifest:
        rootfs.ext4        its root filesystem (ownership, modes, devices as in the image)
        config.json        the OCI image config blob, as pulled
        info.json          {"digest", "size" (bytes unpacked), "created", "source"}
        oci/               the image as pulled, an OCI layout (tag "img"): what push sends
    .lock                  flock(2)ed by every change to the index or the image directories
    .tmp/PID-XXXX/         work in progress: a pull stages its image here, and a commit
                           renames the directory into place (same file system)

Safe under concurrent pyvmm processes: a pull does its long work (fetch, unpack, mkfs)
in its own staging directory without the lock, then takes the lock only to rename the
directory into place and rewrite the index (written aside, fsynced, renamed). A
process killed half way leaves only its staging directory, which the next change to
the store removes once its process is gone. Nothing a reader sees is ever half written.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from vmm.errors import UserError

INDEX_VERSION = 1
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class StoreError(UserError):
    """The store cannot do what was asked (one line for the user)."""


def default_root() -> Path:
    """Where the store lives for this user (see the module docstring)."""
    if os.environ.get("PYVMM_IMAGE_STORE"):
        return Path(os.environ["PYVMM_IMAGE_STORE"])
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                          ".local", "share")
    return Path(data) / "pyvmm" / "images"


def write_aside(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Image:
    """One stored image (a directory of the store)."""

    def __init__(self, path: Path):
        self.path = path
        self.digest = "sha256:" + path.name.partition("-")[2]
        self.rootfs = path / "rootfs.ext4"
        try:
            self.info = json.loads((path / "info.json").read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"image {self.digest[:19]}: unreadable info.json ({e}); "
                             f"remove it with pyvmm rmi {self.digest[7:19]}") from None

    @property
    def short(self) -> str:
        return self.digest[7:19]

    def config(self):
        """The image config (vmm.image.config.ImageConfig)."""
        from vmm.image.config import ImageConfig
        return ImageConfig.from_json((self.path / "config.json").read_bytes())


class Store:
    """The image store at ``root`` (default: ``default_root()``); made on first change."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    # -- locking and staging -----------------------------------------------------------

    @contextmanager
    def lock(self):
        """Hold the store's exclusive lock (flock: released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def staging(self) -> Path:
        """A new, empty staging directory (the caller removes it unless it commits it)."""
        import tempfile
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=tmp))

    def _clean_stale(self) -> None:
        # Under the lock: staging directories whose process is gone.
        tmp = self.root / ".tmp"
        if not tmp.is_dir():
            return
        for entry in tmp.iterdir():
            pid = entry.name.partition("-")[0]
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                    continue
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            elif pid.isdigit():
                continue
            shutil.rmtree(entry, ignore_errors=True)

    # -- the index ---------------------------------------------------------------------

    def _read_index(self) -> dict:
        path = self.root / "index.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable image index ({e})") from None
        tags = doc.get("tags") if isinstance(doc, dict) else None
        if doc.get("version") != INDEX_VERSION or not isinstance(tags, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and DIGEST_RE.match(v)
                for k, v in tags.items()):
            raise StoreError(f"{path}: not a pyvmm image index (version {INDEX_VERSION})")
        return dict(tags)

    def _write_index(self, tags: dict) -> None:
        data = json.dumps({"version": INDEX_VERSION, "tags": dict(sorted(tags.items()))},
                          indent=1).encode() + b"\n"
        write_aside(self.root / "index.json", data)

    def _dir(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise StoreError(f"{digest!r}: not a sha256 digest")
        return self.root / ("sha256-" + digest[7:])

    # -- what callers use --------------------------------------------------------------

    def commit(self, staged: Path, digest: str, names=()) -> Image:
        """Move the staged image directory into place as ``digest`` and tag it ``names``.

        An image already stored under that digest is kept (the staged copy is removed):
        the content is the same by construction.
        """
        with self.lock():
            final = self._dir(digest)
            if final.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                os.rename(staged, final)
            tags = self._read_index()
            for name in names:
                tags[name] = digest
            self._write_index(tags)
            self._clean_stale()
        return Image(final)

    def images(self) -> list[tuple[list[str], Image]]:
        """Every stored image with its tags (sorted), oldest directory order not implied."""
        tags = self._read_index()
        by_digest: dict[str, list[str]] = {}
        for name, digest in tags.items():
            by_digest.setdefault(digest, []).append(name)
        out = []
        if self.root.is_dir():
            for entry in sorted(self.root.iterdir()):
                if entry.name.startswith("sha256-") and entry.is_dir():
                    image = Image(entry)
                    out.append((sorted(by_digest.get(image.digest, [])), image))
        return out

    def resolve(self, name: str) -> Image | None:
        """The image tagged ``name``, or whose digest is ``name`` (``sha256:HEX``, or a
        unique prefix of HEX of at least 6 digits); None if there is none."""
        tags = self._read_index()
        digest = tags.get(name)
        if digest is None:
            hexpart = name[7:] if name.startswith("sha256:") else name
            if len(hexpart) >= 6 and re.fullmatch(r"[0-9a-f]+", hexpart):
                found = [image for _, image in self.images()
                         if image.digest[7:].startswith(hexpart)]
                if len(found) > 1:
                    raise StoreError(f"{name}: more than one image has this digest prefix")
                return found[0] if found else None
            return None
        path = self._dir(digest)
        return Image(path) if path.is_dir() else None

    def remove(self, name: str) -> list[str]:
        """``pyvmm rmi NAME``: untag NAME (a tag), or remove the image NAME (a digest or
        digest prefix) with all its tags. The image directory goes when no tag is left
        (renamed aside first, so no half-removed image is ever visible).

        Returns:
            What was removed: the tag names and ``sha256:...`` of a removed image.
        Raises:
            StoreError: NAME is not in the store.
        """
        with self.lock():
            tags = self._read_index()
            if name in tags:
                digest = tags.pop(name)
                removed = [name]
            else:
                image = self.resolve(name)
                if image is None:
                    raise StoreError(f"{name}: no such image in {self.root} (see pyvmm images)")
                digest = image.digest
                removed = [t for t, d in tags.items() if d == digest]
                for t in removed:
                    del tags[t]
            self._write_index(tags)
            if digest not in tags.values():
                path = self._dir(digest)
                if path.is_dir():
                    aside = self.staging()
                    os.rename(path, aside / path.name)
                    shutil.rmtree(aside, ignore_errors=True)
                    removed.append(digest)
            self._clean_stale()
        return removed
