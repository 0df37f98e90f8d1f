"""A guest agent that speaks the ttyS1 protocol badly (guests/tiny/hostile_agent.c):
vmm.Guest and ``pyvmm run`` neither crash nor hang, hold nothing the agent sends
unasked, and take a command's result only from the frames that answer it.

The "agent" is a bare-metal guest run as the Guest's kernel: milliseconds to start,
where a Linux boot takes minutes here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import requires_kvm
from vmm import guest as guestmod
from vmm.guest import Guest, GuestError, GuestTimeout

pytestmark = requires_kvm

FLOOD = 64 << 10    # each byte goes through the Python UART model: ~60 KB/s here


@pytest.fixture
def initrd(tmp_path):
    path = tmp_path / "initrd"
    path.write_bytes(b"\0" * 4096)      # loaded, never looked at
    return path


def agent(tiny, mode, **defines):
    return tiny("hostile_agent", {"MODE": mode, **defines})


def hostile(tiny, initrd, mode, boot_timeout=20, **kwargs):
    defines = {k: kwargs.pop(k) for k in ("FLOOD",) if k in kwargs}
    return Guest(kernel=agent(tiny, mode, **defines), initrd=initrd, mem="64M",
                 snapshot_cache=False, boot_timeout=boot_timeout, **kwargs)


def wait_console(g, text, timeout=60):
    end = time.monotonic() + timeout
    while text not in g.console:
        assert time.monotonic() < end, g.console
        time.sleep(0.02)


@pytest.mark.parametrize("loop", ["shim", "python"])
def test_frames_sent_between_commands_are_not_the_next_result(tiny, initrd, loop):
    with hostile(tiny, initrd, 2, loop=loop) as g:
        wait_console(g, b"between done")          # sent STDOUT "forged", EXIT 99
        for i in range(1, 3):                     # each answer is followed by EXIT 77
            r = g.run("true", timeout=20)
            assert (r.exit_code, r.stdout) == (0, b"real\n")
            wait_console(g, b"answered\n" * i)   # the forged EXIT has been received
        assert g.dropped_bytes == 6 + 5 + 2 * 5


def test_flood_between_commands_is_dropped_not_queued(tiny, initrd, monkeypatch):
    with hostile(tiny, initrd, 3, FLOOD=FLOOD) as g:
        wait_console(g, b"between done")
        assert g._frames.qsize() == 0
        assert g.dropped_bytes == FLOOD
        # Streamed output is handed on and not kept ...
        got = bytearray()
        r = g.run("true", timeout=60, stdout=got.extend)
        assert (r.exit_code, r.stdout, len(got)) == (0, b"", FLOOD)
        # ... and what is kept is bounded (RUN_KEEP, the newest bytes).
        monkeypatch.setattr(guestmod, "RUN_KEEP", 10000)
        r = g.run("true", timeout=60)
        assert r.exit_code == 0 and len(r.stdout) == 10000
        assert r.stdout == bytes(got[-10000:])


@pytest.mark.parametrize("mode, message", [(4, "frame of 4294967295 bytes"),
                                           (5, "unknown frame type 0x5a")])
def test_bad_frames_end_the_guest_with_one_message(tiny, initrd, mode, message):
    g = hostile(tiny, initrd, mode)
    try:    # the bad frame follows READY at once: start() or run() may see it first
        with pytest.raises(GuestError, match=message):
            g.start()
            g.run("true", timeout=20)
        assert not g.alive
    finally:
        g.close()


def test_truncated_frame_then_silence_times_out(tiny, initrd):
    with hostile(tiny, initrd, 6) as g:
        with pytest.raises(GuestTimeout):
            g.run("true", timeout=2)
        assert not g.alive


def test_agent_that_never_greets_times_out(tiny, initrd):
    g = hostile(tiny, initrd, 7, boot_timeout=2)
    try:
        with pytest.raises(GuestTimeout, match="not ready after 2 s"):
            g.start()
    finally:
        g.close()
    assert b"silent" in g.console


def pyvmm_run(*args, timeout=90, cache_dir=None):
    env = dict(os.environ)
    if cache_dir is not None:   # a snapshot cache of the test's own (vmm/snapshot/cache.py)
        env["PYVMM_SNAPSHOT_CACHE_DIR"] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def test_copy_in_mount_bounded_by_boot_timeout(tiny, initrd, tmp_path):
    (tmp_path / "in").mkdir()
    r = pyvmm_run("--kernel", agent(tiny, 0), "--initrd", initrd, "--mem", "64M",
                  "--copy-in", f"{tmp_path / 'in'}:/mnt", "--boot-timeout", "3", "--", "true",
                  cache_dir=tmp_path / "snapshots")
    assert r.returncode == 124, r.stderr
    # The copy-in mounted alone (booted with its disks), or with the other disks
    # inserted after a snapshot-cache start (vmm/disk/empty.py).
    assert re.search(r"mounting (the copy-in /mnt|the disks) did not finish within the "
                     r"boot timeout", r.stderr), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cached", [False, True], ids=["booted", "snapshot-cache"])
@pytest.mark.parametrize("bound", [["--timeout", "3"], ["--boot-timeout", "3"]])
def test_copy_out_bounded_by_the_timeouts(tiny, initrd, tmp_path, bound, cached):
    out = tmp_path / "out"
    # The agent answers the command (and, with the snapshot cache, the one that sets up
    # the disks inserted after the start: vmm/disk/empty.py), then never the copy-out.
    r = pyvmm_run("--kernel", agent(tiny, 1, ANSWERS=2 if cached else 1), "--initrd", initrd,
                  "--mem", "64M", "--copy-out", f"/etc:{out}", *bound,
                  *([] if cached else ["--no-snapshot-cache"]), "--", "true",
                  cache_dir=tmp_path / "snapshots")
    assert r.returncode == 124, r.stderr
    assert "timed out after 3.0 s" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
