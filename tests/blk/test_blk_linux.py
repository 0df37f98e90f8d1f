"""virtio-blk with the default Linux guest: data in, data out, flushes kept, limits held.

Each test boots Linux (about a minute on emulation-only hosts), so the checks are
grouped: one boot exercises two disks at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import kvm_usable

pytestmark = [pytest.mark.linux, pytest.mark.timeout(600),
              pytest.mark.skipif(kvm_usable() is not None, reason=kvm_usable() or "")]


@pytest.fixture(scope="module")
def default_guest():
    from vmm import guestbuild
    try:
        return guestbuild.default_guest()
    except guestbuild.GuestBuildError as e:
        pytest.skip(f"default guest unavailable: {e}")


def pyvmm_cmd(cmd, *args):
    from vmm.guestbuild import command_param
    return [sys.executable, "-m", "vmm.cli", "boot", "--cmdline", f"{command_param(cmd)} quiet",
            *map(str, args)]


def debugfs(image, request):
    r = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_two_disks_checksums_write_back_readonly_and_discard(default_guest, tmp_path):
    from vmm.images import make_ext4
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    files = {"a.bin": os.urandom(300_000), "deep/er/b.txt": b"pyvmm\n" * 1000, "empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    rw = make_ext4(src, tmp_path / "rw.img", 64 << 20)
    ro = make_ext4(src, tmp_path / "ro.img")
    ro_before = hashlib.sha256(ro.read_bytes()).hexdigest()
    blocks_full = None

    cmd = " && ".join([
        "mkdir -p /a /b", "mount /dev/vda /a", "mount -o ro /dev/vdb /b",
        "cd /a && sha256sum a.bin deep/er/b.txt empty && cd /",
        "cat /sys/block/vdb/ro",
        "(dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null && echo RO-WRITE-OK || echo RO-WRITE-REFUSED)",
        "echo written-by-guest > /a/new.txt",
        # /dev/zero, not urandom: the guest kernel's ChaCha20 is interpreted on
        # emulation-only hosts (~3 min for 8 MiB); zeros are written out just the same.
        "dd if=/dev/zero of=/a/big bs=1M count=8 2>/dev/null", "sync", "echo BIG-SYNCED",
        "sleep 3", "rm /a/big", "sync", "fstrim -v /a", "sync",
        "umount /a", "umount /b", "echo ALL-DONE"])
    proc = subprocess.Popen([*pyvmm_cmd(cmd, "--disk", rw, "--disk", f"{ro},ro")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out = b""
    try:
        while True:                             # sample the host file while /a/big exists
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            if b"BIG-SYNCED" in line:
                blocks_full = os.stat(rw).st_blocks
        err = proc.stderr.read()
        assert proc.wait() == 0, (out, err)
    finally:                                    # a test that fails or times out ends the VM
        proc.kill()
        proc.wait()
    text = out.decode(errors="replace").replace("\r\n", "\n")   # the guest tty adds CRs
    for name, data in files.items():
        assert f"{hashlib.sha256(data).hexdigest()}  {name}" in text
    assert re.search(r"^1$", text, re.M), "virtio-blk RO feature not seen by the guest"
    assert "RO-WRITE-REFUSED" in text and "RO-WRITE-OK" not in text
    assert "ALL-DONE" in text and "pyvmm: exit 0" in text
    assert debugfs(rw, "cat /new.txt") == b"written-by-guest\n"
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_before
    # DISCARD punched the freed 8 MiB out of the host file.
    assert blocks_full is not None
    assert os.stat(rw).st_blocks < blocks_full - (6 << 20) // 512


def test_synced_data_survives_sigkill_of_the_vmm(default_guest, tmp_path):
    from vmm.images import make_ext4
    img = make_ext4(None, tmp_path / "disk.img", 64 << 20)
    # Data made in user space (seq: distinct lines, ~2 MiB), not by the guest kernel's
    # RNG, whose ChaCha20 is interpreted on emulation-only hosts (2 MiB: minutes).
    cmd = ("mkdir -p /a && mount /dev/vda /a && seq 1 300000 "
           "> /a/data && sync && sha256sum /a/data && echo SYNCED && sleep 1000")
    proc = subprocess.Popen(pyvmm_cmd(cmd, "--disk", img), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    digest = None
    deadline = time.monotonic() + 500
    try:
        for line in proc.stdout:
            m = re.match(rb"([0-9a-f]{64})  /a/data", line)
            if m:
                digest = m.group(1).decode()
            if b"SYNCED" in line:
                proc.send_signal(signal.SIGKILL)     # right after the guest's sync returned
                break
            assert time.monotonic() < deadline
    finally:
        proc.kill()
        proc.wait()
    assert digest is not None
    data = debugfs(img, "cat /data")
    assert len(data) == len("".join(f"{n}\n" for n in range(1, 300001)))
    assert hashlib.sha256(data).hexdigest() == digest


def test_second_vm_on_the_same_image_is_refused(tiny, tmp_path):
    from vmm.images import make_ext4
    img = make_ext4(None, tmp_path / "shared.img")
    first = subprocess.Popen([sys.executable, "-m", "vmm.cli", "boot", "--raw", str(tiny("halt_forever")),
                              "--disk", str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    try:
        assert first.stdout.readline() == b"halting\n"     # the first VM holds the image
        for spec in (str(img), f"{img},ro"):
            r = subprocess.run([sys.executable, "-m", "vmm.cli", "boot", "--raw", str(tiny("hello")),
                                "--disk", spec], capture_output=True, text=True, stdin=subprocess.DEVNULL)
            assert r.returncode == 2
            assert r.stderr.count("\n") == 1 and "shared.img" in r.stderr and "in use" in r.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    assert first.returncode == 130
