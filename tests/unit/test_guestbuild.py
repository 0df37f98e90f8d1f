"""Tests of vmm.guestbuild that need no kernel build: cache keys, the config check,
the command parameter, and a real (quick) initramfs build parsed back with Python."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path

import pytest

from vmm import guestbuild as gb

SRC = "6.1.192-3"
FRAG = b"CONFIG_64BIT=y\nCONFIG_TMPFS=y\n"
PATCHES = [("0001-a.patch", b"--- a/x\n+++ b/x\n")]


# --- cache keys ---------------------------------------------------------------------


def key(src=SRC, frag=FRAG, patches=PATCHES, compression="gzip") -> str:
    return gb.kernel_cache_key(src, frag, patches, compression)


def test_kernel_key_is_stable():
    assert key() == key()
    assert key(patches=[(n, bytes(d)) for n, d in PATCHES]) == key()
    assert len(key()) == 16 and all(c in "0123456789abcdef" for c in key())


@pytest.mark.parametrize("change", [
    dict(frag=FRAG + b"CONFIG_EXT4_FS=y\n"),
    dict(patches=[("0001-a.patch", b"--- a/x\n+++ b/y\n")]),
    dict(patches=PATCHES + [("0002-b.patch", b"")]),
    dict(patches=[]),
    dict(compression="xz"),
    dict(src="6.1.192-4"),
])
def test_kernel_key_changes_with_each_input(change):
    assert key(**change) != key()


def test_tree_key_ignores_compression_only():
    assert gb.tree_cache_key(SRC, FRAG, PATCHES) == gb.tree_cache_key(SRC, FRAG, PATCHES)
    assert gb.tree_cache_key(SRC, FRAG + b"#\n", PATCHES) != \
        gb.tree_cache_key(SRC, FRAG, PATCHES)
    # Compression variants share one tree but get distinct result directories.
    assert key(compression="lz4") != key(compression="zstd")


def test_recipe_version_is_part_of_the_key(monkeypatch):
    before = key()
    monkeypatch.setattr(gb, "BUILD_RECIPE_VERSION", gb.BUILD_RECIPE_VERSION + 1)
    assert key() != before


def test_initramfs_key_tracks_init_and_busybox():
    k = gb.initramfs_cache_key(b"#!/bin/sh\n", b"\x7fELF...")
    assert k == gb.initramfs_cache_key(b"#!/bin/sh\n", b"\x7fELF...")
    assert k != gb.initramfs_cache_key(b"#!/bin/sh\n\n", b"\x7fELF...")
    assert k != gb.initramfs_cache_key(b"#!/bin/sh\n", b"\x7fELF..!")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gb.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PYVMM_CACHE")
    assert gb.cache_dir() == tmp_path / "x" / "pyvmm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gb.cache_dir() == Path.home() / ".cache" / "pyvmm"


# --- config fragment verification ----------------------------------------------------

FINAL_CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
CONFIG_HZ_100=y
CONFIG_HZ=100
# CONFIG_VT is not set
CONFIG_NR_CPUS=8
CONFIG_CMDLINE="a b"
"""


def test_check_config_accepts_what_took_effect():
    frag = ("# comment\nCONFIG_64BIT=y\nCONFIG_HZ=100\n# CONFIG_VT is not set\n"
            "# CONFIG_PNP is not set\nCONFIG_NR_CPUS=8\nCONFIG_CMDLINE=\"a b\"\n")
    # CONFIG_PNP is absent from the final config: absent means "n", as in Kconfig.
    assert gb.check_config(frag, FINAL_CONFIG) == []


def test_check_config_reports_each_option_that_did_not_take_effect():
    frag = ("CONFIG_64BIT=y\nCONFIG_TMPFS=y\nCONFIG_HZ=250\nCONFIG_VT=y\n"
            "# CONFIG_HZ_100 is not set\nCONFIG_NR_CPUS=8\n")
    assert gb.check_config(frag, FINAL_CONFIG) == [
        "CONFIG_TMPFS: wanted y, got n",       # missing (unmet dependency)
        "CONFIG_HZ: wanted 250, got 100",       # different value
        "CONFIG_VT: wanted y, got n",           # explicitly not set
        "CONFIG_HZ_100: wanted n, got y",       # should have been off
    ]


def test_parse_config_ignores_comments_and_later_lines_win():
    text = "# The option (CONFIG_X) is not set here\nCONFIG_A=y\nCONFIG_A=m\n"
    assert gb.parse_config(text) == {"CONFIG_A": "m"}


def test_effective_fragment_sets_exactly_one_compression():
    frag = "CONFIG_64BIT=y\nCONFIG_KERNEL_XZ=y\n# CONFIG_KERNEL_GZIP is not set\n"
    eff = gb.parse_config(gb.effective_fragment(frag, "zstd"))
    assert eff == {"CONFIG_64BIT": "y", "CONFIG_KERNEL_ZSTD": "y"}
    with pytest.raises(gb.GuestBuildError, match="unknown kernel compression"):
        gb.effective_fragment(frag, "brotli")


def test_repository_fragment_covers_the_essentials():
    frag = gb.parse_config(gb.FRAGMENT_PATH.read_text())
    for sym in ("CONFIG_64BIT", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_VIRTIO_MMIO",
                "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK",
                "CONFIG_EXT4_FS", "CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS_MOUNT",
                "CONFIG_TMPFS", "CONFIG_BINFMT_SCRIPT", "CONFIG_MAGIC_SYSRQ",
                "CONFIG_KVM_GUEST", "CONFIG_SMP", "CONFIG_HZ_100", "CONFIG_SLUB"):
        assert frag.get(sym) == "y", sym
    assert frag["CONFIG_VT"] == "n" and frag["CONFIG_RANDOMIZE_BASE"] == "n"
    # The compression is build_kernel's choice, not the fragment's.
    assert not set(frag) & set(gb.COMPRESSIONS.values())


def test_syscall_patch_is_present():
    names = [p.name for p in gb.PATCHES_DIR.glob("*.patch")]
    assert "0001-x86-mm-run-syscalls-that-fault-at-entry_SYSCALL_64.patch" in names


# --- the guest's command-line contract -----------------------------------------------


def test_command_param_round_trips():
    cmd = "echo 'hi there' && exit 3"
    param = gb.command_param(cmd)
    name, value = param.split("=", 1)
    assert name == gb.CMD_PARAM and " " not in param
    assert base64.b64decode(value).decode() == cmd


def test_markers_match_the_init_script():
    init = gb.INIT_SCRIPT_PATH.read_text()
    assert f'echo "{gb.READY_MARKER}"' in init
    assert f'echo "{gb.EXIT_MARKER} $?"' in init
    assert f"{gb.CMD_PARAM}=*" in init
    assert gb.EXIT_MARKER_RE.search("junk\r\npyvmm: exit 42\r\n").group(1) == "42"


# --- initramfs: a real build, parsed back --------------------------------------------


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc ("070701") cpio archive into {name: (mode, body)}."""
    entries: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad newc magic at {off}"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_off = off + 110
        name = data[name_off:name_off + namesize - 1].decode()
        body_off = (name_off + namesize + 3) & ~3
        body = data[body_off:body_off + filesize]
        off = (body_off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


busybox_missing = not gb.DEFAULT_BUSYBOX.is_file() or not gb.is_static_elf(
    gb.DEFAULT_BUSYBOX.read_bytes())


@pytest.mark.skipif(busybox_missing or shutil.which("cpio") is None,
                    reason="needs a static /bin/busybox (Debian busybox-static) and "
                           "cpio: run scripts/setup-host.sh")
def test_build_initramfs_produces_newc_with_init_busybox_and_links(monkeypatch,
                                                                   tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    monkeypatch.delenv("PYVMM_BUSYBOX", raising=False)
    path = gb.build_initramfs()
    assert path.is_relative_to(tmp_path) and path.name == "initramfs.cpio"
    entries = parse_newc(path.read_bytes())

    mode, body = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert body == gb.INIT_SCRIPT_PATH.read_bytes()

    mode, body = entries["bin/busybox"]
    assert stat.S_ISREG(mode) and body == gb.DEFAULT_BUSYBOX.read_bytes()

    for applet in ("bin/sh", "bin/mount", "bin/base64", "bin/cttyhack", "sbin/reboot",
                   "sbin/poweroff", "usr/bin/setsid"):
        mode, body = entries[applet]
        assert stat.S_ISLNK(mode) and body == b"/bin/busybox", applet
    for d in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(entries[d][0]), d
    # Every applet busybox knows has its link.
    assert set(gb.busybox_applets(gb.DEFAULT_BUSYBOX)) - {"bin/busybox"} <= set(entries)

    # Cached: a second call returns the same file without rebuilding.
    mtime = os.stat(path).st_mtime_ns
    assert gb.build_initramfs() == path and os.stat(path).st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp-*"))


def test_is_static_elf_rejects_non_elf_and_dynamic(tmp_path):
    assert not gb.is_static_elf(b"#!/bin/sh\n" + bytes(64))
    sh = Path("/bin/sh").resolve()
    if sh.is_file() and sh.read_bytes()[:4] == b"\x7fELF":
        assert not gb.is_static_elf(sh.read_bytes())  # dynamically linked on Debian
