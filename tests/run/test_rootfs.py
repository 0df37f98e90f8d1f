"""``pyvmm run --rootfs IMG``: commands run in the image, which is never modified, on an
overlay that is gone when the VM ends — also when pyvmm is SIGKILLed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.run.conftest import BOOT_TIMEOUT_S, pyvmm_run, pyvmm_run_argv

pytestmark = [pytest.mark.linux, pytest.mark.timeout(2 * BOOT_TIMEOUT_S)]


@pytest.fixture
def rootfs(tmp_path) -> Path:
    """A tiny root filesystem: static busybox and a marker file, as an ext4 image."""
    from vmm.images import make_ext4
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static not installed")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "ls", "sleep"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "marker").write_text("from the image\n")
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    return make_ext4(tree, img_dir / "root.img")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_commands_run_in_the_rootfs_and_the_image_is_never_modified(guest_ready, rootfs):
    before, mtime = digest(rootfs), rootfs.stat().st_mtime_ns
    r = pyvmm_run("--rootfs", str(rootfs), "--", "sh", "-c",
                  "cat /etc/marker; echo changed > /etc/marker; cat /etc/marker; "
                  "test -e /bin/pyvmm-agent || echo no-agent-here")
    assert r.returncode == 0, r.describe()
    assert r.stdout.splitlines()[:2] == [b"from the image", b"changed"]
    assert b"no-agent-here" in r.stdout          # we are in the image, not the initramfs
    assert digest(rootfs) == before and rootfs.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(rootfs.parent)) == ["root.img"]


def test_overlay_gone_after_sigkill(guest_ready, rootfs, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = digest(rootfs)
    proc = subprocess.Popen([*pyvmm_run_argv(), "--rootfs", str(rootfs), "--", "sh", "-c",
                             "echo writing > /etc/marker && cat /etc/marker && sleep 1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=str(tmpdir)))
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    try:
        assert proc.stdout.readline() == b"writing\n"   # the guest has written to its disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert time.monotonic() < deadline
    assert sorted(os.listdir(rootfs.parent)) == ["root.img"]
    assert os.listdir(tmpdir) == []
    assert digest(rootfs) == before
