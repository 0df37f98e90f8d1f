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

Start-up path: imports only os, vmm.guestdefs and vmm.paths (not json: see
vmm.paths.write_records).
"""

from __future__ import annotations

import os

from vmm import __version__
from vmm.guestdefs import (AGENT_PARAM, BUILD_RECIPE_VERSION, CMD_PARAM,  # noqa: F401
                           EXIT_MARKER, READY_MARKER, ROOTFS_PARAM)
from vmm.paths import cache_dir, guests_dir, read_records, write_records


#: Environment variables that choose inputs (a change invalidates the manifest).
_ENV = ("CC", "PATH", "PYVMM_BUSYBOX")
_MANIFEST_VERSION = "2"


def manifest_path() -> str:
    """One manifest per installed copy of the guest sources (two venvs don't fight)."""
    tag = 0x811C9DC5                     # FNV-1a of the path (zlib costs an import)
    for byte in guests_dir().encode():
        tag = ((tag ^ byte) * 0x01000193) & 0xFFFFFFFF
    return os.path.join(cache_dir(), f"default-guest-{tag:08x}")


def _stat(path: str) -> str:
    """``size mtime_ns inode`` of ``path``, or ``-`` when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _env_records() -> list[tuple[str, str]]:
    return [(f"env.{k}", "-" if os.environ.get(k) is None else "=" + os.environ[k])
            for k in _ENV]


def _patches() -> str:
    return "/".join(sorted(os.listdir(os.path.join(guests_dir(), "linux", "patches"))))


def _lookup() -> tuple[str, str] | None:
    """The recorded (vmlinux, initramfs) if the manifest still holds, else None."""
    try:
        records = read_records(manifest_path())
    except (OSError, ValueError):
        return None
    head = dict(records)
    want = {"manifest": _MANIFEST_VERSION, "pyvmm": __version__,
            "recipe": str(BUILD_RECIPE_VERSION), **dict(_env_records())}
    if any(head.get(k) != v for k, v in want.items()):
        return None
    try:
        if head.get("patches") != _patches():
            return None
    except OSError:
        return None
    for key, value in records:
        if key == "input":
            st, _, path = value.partition("\t")    # "<size> <mtime> <inode>\t<path>"
            if _stat(path) != st:
                return None
    vmlinux, initramfs = head.get("vmlinux"), head.get("initramfs")
    if not vmlinux or not initramfs or _stat(vmlinux) == "-" or _stat(initramfs) == "-":
        return None
    return vmlinux, initramfs


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
    except (OSError, ValueError):
        pass  # a read-only cache (or an odd path) still works, only slower
    return str(vmlinux), str(initramfs)


def write_manifest(vmlinux: str, initramfs: str, inputs: list[str]) -> None:
    """Record the results and the current state of ``inputs`` (file paths)."""
    records = [("manifest", _MANIFEST_VERSION), ("pyvmm", __version__),
               ("recipe", str(BUILD_RECIPE_VERSION)), *_env_records(),
               ("patches", _patches()),
               *(("input", f"{_stat(p)}\t{p}") for p in inputs),
               ("vmlinux", vmlinux), ("initramfs", initramfs)]
    write_records(manifest_path(), records)
