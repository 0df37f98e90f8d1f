"""Least privilege (issue 14, item 2): close-on-exec fds, PR_SET_NO_NEW_PRIVS,
RLIMIT_NOFILE, ``--user`` (vmm/privileges.py, docs/security.md)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import requires_kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LIST_FDS = ("import os\n"
             "for n in sorted(os.listdir('/proc/self/fd')):\n"
             "    try: print(n, os.readlink('/proc/self/fd/' + n))\n"
             "    except OSError: pass\n")


def pyvmm(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "vmm.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@requires_kvm
def test_vm_fds_are_close_on_exec_and_no_child_inherits_them(tmp_path):
    """The fds of a VM (/dev/kvm, VM, vCPU, eventfds, a disk, pipes) are all
    close-on-exec, so a child spawned even with close_fds=False (as debugfs and mkfs
    are, with pass_fds) sees none of them."""
    from vmm.disk.raw import RawDisk
    from vmm.iothread import IoThread
    from vmm.kvm import Kvm

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        io = IoThread()
        ev = io.add(lambda: None)
        disk = RawDisk(image)
        r, w = os.pipe()
        try:
            fds = {"kvm": kvm.fd, "vm": vm.fd, "vcpu": vcpu.fd, "eventfd": ev, "r": r, "w": w}
            for name, fd in fds.items():
                assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, name
            child = subprocess.run([sys.executable, "-c", _LIST_FDS], close_fds=False,
                                   capture_output=True, text=True, check=True)
            targets = child.stdout
            assert "kvm" not in targets and "eventfd" not in targets, targets
            assert str(image) not in targets, targets
            for fd in (r, w):
                assert os.readlink(f"/proc/self/fd/{fd}") not in targets, targets
            # pass_fds hands over exactly the fd asked for.
            child = subprocess.run([sys.executable, "-c", _LIST_FDS], pass_fds=(r,),
                                   capture_output=True, text=True, check=True)
            assert f"{r} pipe:" in child.stdout and "kvm" not in child.stdout
        finally:
            os.close(r)
            os.close(w)
            disk.close()
            io.close()
            vcpu.close()
            vm.close()


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.split()
    return out


@requires_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_boot_as_user_drops_privileges_and_sets_no_new_privs(tiny):
    """pyvmm boot --user 65534 runs the guest as uid/gid 65534 with no groups,
    NoNewPrivs 1 and a bounded RLIMIT_NOFILE, with /dev/kvm opened as root."""
    proc = pyvmm("boot", "--raw", str(tiny("halt_forever")), "--user", "65534:65534",
                 "--timeout", "20")
    try:
        deadline = time.monotonic() + 15
        seen = None
        while time.monotonic() < deadline and proc.poll() is None:
            st = _status(proc.pid)
            fds = [os.readlink(f"/proc/{proc.pid}/fd/{n}")
                   for n in os.listdir(f"/proc/{proc.pid}/fd")]
            if st["Uid"][0] == "65534" and any("kvm-vcpu" in t for t in fds):
                seen = st
                break
            time.sleep(0.05)
        assert seen is not None, proc.communicate(timeout=30)
        assert seen["Uid"] == ["65534"] * 4 and seen["Gid"] == ["65534"] * 4
        assert seen.get("Groups", []) == []
        assert seen["NoNewPrivs"] == ["1"]
        with open(f"/proc/{proc.pid}/limits") as f:
            limits = [line for line in f if line.startswith("Max open files")]
        assert limits and limits[0].split()[3] == "1024", limits
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("user", ["", ":", "0", "root", "nosuchuser-pyvmm", "65534:",
                                  "65534:nosuchgroup-pyvmm", "4294967295"])
def test_bad_user_is_one_line_exit_2(user):
    proc = pyvmm("boot", "--raw", "/etc/hostname", "--user", user)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 2, errs
    assert len(errs.strip().splitlines()) == 1 and "Traceback" not in errs, errs


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_user_when_not_root_is_one_line_exit_2():
    # The child becomes 65534 itself, after its imports (this interpreter's files may
    # not be readable by 65534), then runs pyvmm's main.
    code = ("import os, sys, pwd, grp, argparse, vmm.cli, vmm.cli.boot, vmm.privileges\n"
            "os.setgroups([]); os.setresgid(65534, 65534, 65534)\n"
            "os.setresuid(65534, 65534, 65534)\n"
            "sys.exit(vmm.cli.main(['boot', '--raw', '/etc/hostname', '--user', '65534']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "needs pyvmm started as root" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_privileges_unit(tmp_path):
    """parse_user and limit_open_files, in a child (the limit is process-wide). (Its
    NoNewPrivs may be set already: tests that call vmm.cli.main in-process set it on
    pytest, and children inherit it; the --user test checks a fresh pyvmm.)"""
    from vmm.privileges import parse_user
    assert parse_user("65534:65533") == (65534, 65533)
    assert parse_user("nobody")[0] == 65534
    code = ("import resource\n"
            "from vmm.privileges import harden, no_new_privs_set\n"
            "harden()\n"
            "assert no_new_privs_set()\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["1024"]
