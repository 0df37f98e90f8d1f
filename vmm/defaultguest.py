"""The default Linux guest, found in the cache without any build machinery.

:mod:`vmm.guestbuild` builds the guest and names each result by a hash of every input;
computing that hash needs subprocesses (``dpkg-query`` for the source package version,
the compiler's ``--version``) and reading every input, ~100 ms. Every ``pyvmm boot``,
``pyvmm run`` and ``Guest()`` needs the guest, so after a build (or a cache lookup)
this module writes a small *manifest*: the result paths plus the size, mtime and
inode of each input file and the environment variables that select inputs.
A later start that finds every input unchanged (a few ``stat`` calls) uses the
recorded paths directly; anything else falls back to :mod:`vmm.guestbuild`, whose
content hashes stay the authority (an unchanged input with a new mtime only costs one
key computation, then the manifest is rewritten).

Start-up path: imports only os, json, vmm.guestdefs and vmm.paths.
"""

from __future__ import annotations

import json
import os

from vmm import __version__
from vmm.guestdefs import (AGENT_PARAM, BUILD_RECIPE_VERSION, CMD_PARAM,  # noqa: F401
                           EXIT_MARKER, READY_MARKER, ROOTFS_PARAM)
from vmm.paths import cache_dir, guests_dir, write_atomic


#: Environment variables that choose inputs (a change invalidates the manifest).
_ENV = ("CC", "PATH", "PYVMM_BUSYBOX")
_MANIFEST_VERSION = 1


def manifest_path() -> str:
    """One manifest per installed copy of the guest sources (two venvs don't fight)."""
    import zlib
    tag = zlib.crc32(guests_dir().encode()) & 0xFFFFFFFF
    return os.path.join(cache_dir(), f"default-guest-{tag:08x}.json")


def _stat(path: str) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _lookup() -> tuple[str, str] | None:
    """The recorded (vmlinux, initramfs) if the manifest still holds, else None."""
    try:
        with open(manifest_path(), "rb") as f:
            m = json.loads(f.read())
        if (m.get("version") != _MANIFEST_VERSION or m.get("pyvmm") != __version__
                or m.get("recipe") != BUILD_RECIPE_VERSION
                or m.get("env") != {k: os.environ.get(k) for k in _ENV}):
            return None
        if any(_stat(path) != st for path, st in m["inputs"]):
            return None
        patches = os.path.join(guests_dir(), "linux", "patches")
        if sorted(os.listdir(patches)) != m["patches"]:
            return None
        vmlinux, initramfs = m["vmlinux"], m["initramfs"]
        if _stat(vmlinux) is None or _stat(initramfs) is None:
            return None
        return vmlinux, initramfs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def default_guest() -> tuple[str, str]:
    """``(vmlinux, initramfs)`` of the default guest: from the manifest when it holds,
    else built or found by :func:`vmm.guestbuild.default_guest` (and the manifest
    rewritten).

    Raises:
        vmm.guestbuild.GuestBuildError: the guest had to be built and that failed.
    """
    hit = _lookup()
    if hit is not None:
        return hit
    from vmm import guestbuild
    vmlinux, initramfs = guestbuild.default_guest()
    try:
        write_manifest(str(vmlinux), str(initramfs), guestbuild.input_files())
    except OSError:
        pass  # a read-only cache still works, only slower
    return str(vmlinux), str(initramfs)


def write_manifest(vmlinux: str, initramfs: str, inputs: list[str]) -> None:
    """Record the results and the current state of ``inputs`` (file paths)."""
    m = {
        "version": _MANIFEST_VERSION,
        "pyvmm": __version__,
        "recipe": BUILD_RECIPE_VERSION,
        "env": {k: os.environ.get(k) for k in _ENV},
        "inputs": [[p, _stat(p)] for p in inputs],
        "patches": sorted(os.listdir(os.path.join(guests_dir(), "linux", "patches"))),
        "vmlinux": vmlinux,
        "initramfs": initramfs,
    }
    write_atomic(manifest_path(), json.dumps(m, indent=1).encode())
