"""A careless user and a hostile agent, without a VM: one-line errors (never a
traceback), files refused before anything blocks, nothing left half written, and the
host side of the agent channel bounded whatever the agent sends."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from tests.unit.test_loader import make_bzimage
from vmm.guest import HEADER, T_EXIT, T_STDOUT, Guest
from vmm.hostfiles import ConsoleLog, HostFileError, open_log, open_regular
from vmm.loader import LoaderError, load_kernel
from vmm.memory import GuestMemory
from vmm.terminal import ConsoleOutput


def pyvmm(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def one_line(r, status=2):
    assert r.returncode == status, r
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


# -- timeouts ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["boot", "run", "restore"])
@pytest.mark.parametrize("value", ["inf", "1e309", "nan", "-1", "0", "-inf", "x"])
def test_timeouts_must_be_positive_and_finite(command, value):
    positional = {"boot": ["--raw", "/etc/hostname"], "run": [], "restore": ["/tmp"]}[command]
    r = pyvmm(command, *positional, "--timeout", value, *(["--", "true"] if command == "run" else []))
    assert "--timeout" in one_line(r)


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_run_boot_timeout_must_be_positive_and_finite(value):
    assert "--boot-timeout" in one_line(pyvmm("run", "--boot-timeout", value, "--", "true"))


# -- other inputs -------------------------------------------------------------------------

def test_non_utf8_disk_serial_is_one_line(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    arg = os.fsdecode(os.fsencode(str(img)) + b",serial=\xff\xfe")
    assert "serial" in one_line(pyvmm("boot", "--raw", "/etc/hostname", "--disk", arg))


def test_unknown_pyvmm_loop_is_one_line():
    msg = one_line(pyvmm("boot", "--raw", "/etc/hostname", env={"PYVMM_LOOP": "turbo"}))
    assert "PYVMM_LOOP" in msg


def test_bare_pyvmm_is_a_short_usage_and_one_line():
    r = pyvmm()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: pyvmm")
    assert lines[1] == "pyvmm: no command given (see pyvmm --help)"


@pytest.mark.parametrize("size", ["4K", "100T"])        # mkfs.ext4 fails; truncate fails
def test_mkfs_failure_leaves_nothing_and_names_the_image(tmp_path, size):
    image = tmp_path / "x.img"
    msg = one_line(pyvmm("mkfs", "-", image, "--size", size))
    assert str(image) in msg and ".tmp" not in msg
    assert os.listdir(tmp_path) == []


def test_mkfs_into_a_missing_directory_names_the_image(tmp_path):
    image = tmp_path / "no" / "x.img"
    msg = one_line(pyvmm("mkfs", "-", image))
    assert str(image) in msg and ".tmp" not in msg


# -- FIFOs and other files that are not what they should be -------------------------------

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_without_blocking(fifo, tmp_path):
    # With a plain open() each of these would block until a writer/reader appears.
    with pytest.raises(HostFileError, match="is a FIFO"):
        open_regular(fifo, "kernel")
    with pytest.raises(HostFileError, match="is a FIFO"):
        open_log(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # a FIFO with a reader too
    try:
        with pytest.raises(HostFileError, match="is a FIFO"):
            open_log(fifo)
    finally:
        os.close(reader)
    with pytest.raises(HostFileError, match="is a directory"):
        open_regular(tmp_path, "initrd")
    with open_log("/dev/null") as f:                       # character devices are fine
        f.write(b"x")


def test_a_fifo_kernel_is_a_loader_error(fifo):
    mem = GuestMemory(64 << 20)
    try:
        with pytest.raises(LoaderError, match="kernel .*fifo: is a FIFO"):
            load_kernel(mem, fifo)
    finally:
        mem.close()


def test_console_log_on_a_full_disk_reports_once_and_output_goes_on(capfd):
    r, w = os.pipe()
    try:
        out = ConsoleOutput(fd=w, log_path="/dev/full")
        for _ in range(3):
            out.write(b"guest line\n")          # raised OSError (ENOSPC) before
        out.close()
        assert os.read(r, 100) == b"guest line\n" * 3
    finally:
        os.close(r)
        os.close(w)
    err = capfd.readouterr().err.splitlines()
    assert err == ["pyvmm: --console-log /dev/full: No space left on device; "
                   "no longer writing the console log"]


def test_console_log_object_reports_once():
    said = []
    log = ConsoleLog("/dev/full", said.append)
    log.write(b"a")
    log.write(b"b")
    log.close()
    assert len(said) == 1 and "No space left" in said[0]


# -- bzImage pref_address -------------------------------------------------------------------

@pytest.mark.parametrize("pref, relocatable", [(0x0, 1), (0x7000, 1), (0x1000, 0),
                                               (0x80000, 1)])
def test_bzimage_pref_address_over_the_boot_structures_is_refused(tmp_path, pref, relocatable):
    img = make_bzimage(b"\x99" * 64, pref_address=pref, relocatable=relocatable,
                       kernel_alignment=0x1000)
    path = tmp_path / "bz"
    path.write_bytes(img)
    mem = GuestMemory(64 << 20)
    try:
        if pref == 0:    # no preference: loaded at 1 MiB, as before
            assert load_kernel(mem, path, mode="bzimage").entry == 0x100000 + 0x200
            return
        with pytest.raises(LoaderError, match="below 0x100000"):
            load_kernel(mem, path, mode="bzimage")
    finally:
        mem.close()


# -- the agent channel, fed hostile bytes on the host side ----------------------------------

def frame(ftype, payload):
    return HEADER.pack(ftype, len(payload)) + payload


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_64_mib_sent_between_commands_is_dropped_not_held():
    g = Guest(kernel="/nonexistent", initrd="/nonexistent", snapshot_cache=False)
    chunk = frame(T_STDOUT, b"x" * 4096) * 16              # 64 KiB of frames
    before = rss_kib()
    for _ in range(1024):                                  # 64 MiB in all
        g._on_serial2(chunk)
    g._on_serial2(frame(T_EXIT, struct.pack("<Bi", 0, 99)))  # a forged status
    grown = rss_kib() - before
    assert g._frames.qsize() == 0
    assert g.dropped_bytes == (64 << 20) + 5
    assert len(g._parser._buf) == 0
    assert grown < 8 << 10, f"RSS grew by {grown} KiB"     # was 65 MiB held
