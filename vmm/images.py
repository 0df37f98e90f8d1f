"""Disk images: an ext4 filesystem made from a host directory, without root.

Uses e2fsprogs' ``mkfs.ext4 -d DIR`` (populate from a directory, e2fsprogs ≥ 1.43),
which needs no loop device and no privileges.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from vmm.errors import UserError


class ImageError(UserError):
    """An image could not be made (one line, meant for the user)."""


def dir_size(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def make_ext4(source: str | os.PathLike | None, image: str | os.PathLike, size: int | None = None,
              label: str = "pyvmm", inodes: int | None = None) -> Path:
    """Create ``image`` as an ext4 filesystem holding a copy of ``source`` (or empty).

    Args:
        source: host directory to copy in, or None for an empty filesystem.
        image: output file (replaced if it exists).
        size: bytes; default: the directory's size plus room (at least 16 MiB).
        inodes: how many inodes to make (mkfs.ext4 -N); default: mkfs.ext4's choice.
    """
    mkfs = shutil.which("mkfs.ext4") or next((p for p in ("/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4")
                                             if os.path.exists(p)), None)
    if mkfs is None:
        raise ImageError("mkfs.ext4 not found: install e2fsprogs (scripts/setup-host.sh)")
    image = Path(image)
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise ImageError(f"{source}: not a directory")
    if size is None:
        content = dir_size(source) if source is not None else 0
        size = max(16 << 20, int(content * 1.3) + (8 << 20))
    size = (size + 4095) // 4096 * 4096
    # Made aside and renamed into place: a failure (or Ctrl-C) leaves neither a partial
    # image nor the temporary file, and the error names the image, not the temporary.
    tmp = image.with_name(f".{image.name}.pyvmm-{os.getpid()}.tmp")
    done = False
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        cmd = [mkfs, "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-O", "^has_journal"]
        if inodes is not None:
            cmd += ["-N", str(inodes)]
        if source is not None:
            cmd += ["-d", str(source)]
        r = subprocess.run([*cmd, str(tmp)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["failed"])[-1].replace(str(tmp), str(image))
            raise ImageError(f"mkfs.ext4 failed for {image}: {msg}")
        os.replace(tmp, image)
        done = True
    except OSError as e:
        raise ImageError(f"cannot make {image}: {e.strerror or e}") from None
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return image
