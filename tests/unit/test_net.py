"""Network backends (vmm/net) without a VM: --net/--publish parsing, passt started for
real (readiness, port forwarding, errors, its lifetime) and a TAP device (as root)."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from vmm.net import NetError, Publish, parse_net, parse_publish
from vmm.net import base

MAC = bytes.fromhex("525400c0ffee")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def passt_pids(marker: str) -> list[int]:
    """pids of passt processes whose command line contains ``marker``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{d}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and argv and argv[0].endswith(b"passt") and marker.encode() in b" ".join(argv):
            pids.append(int(d))
    return pids


def wait_gone(marker: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not passt_pids(marker):
            return True
        time.sleep(0.05)
    return False


# --- parsing -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    ("8080:80", Publish("tcp", "", 8080, 80)),
    ("8080:80/udp", Publish("udp", "", 8080, 80)),
    ("127.0.0.1:2222:22/tcp", Publish("tcp", "127.0.0.1", 2222, 22)),
    ("[::1]:53:5353/udp", Publish("udp", "::1", 53, 5353)),
])
def test_parse_publish(spec, want):
    assert parse_publish(spec) == want
    assert parse_publish(str(want)) == want


@pytest.mark.parametrize("spec", ["", "80", "a:80", "80:0", "80:65536", "1:2:3:4",
                                  "8080:80/sctp", "host:80:80", ":80:80", "[::1]80:80",
                                  "[::1:80:80"])
def test_parse_publish_rejects(spec):
    with pytest.raises(NetError) as e:
        parse_publish(spec)
    assert "\n" not in str(e.value)


def test_parse_net():
    assert parse_net("none") is None
    user = parse_net("user", ["8080:80"])
    assert user.mode == "user" and user.publish == [Publish("tcp", "", 8080, 80)]
    tap = parse_net("tap=tap0")
    assert tap.mode == "tap" and tap.tap == "tap0"
    for bad, publish in (("bogus", ()), ("tap", ()), ("tap=", ()), ("tap=" + "x" * 16, ()),
                         ("user=1", ()), ("none", ["80:80"]), ("tap=t0", ["80:80"])):
        with pytest.raises(NetError):
            parse_net(bad, publish)


def test_macs_distinct_and_locally_administered():
    macs = {parse_net("user").mac for _ in range(20)}
    assert len(macs) == 20
    for mac in macs:
        assert len(mac) == 6 and mac[0] & 2 and not mac[0] & 1


# --- passt ---------------------------------------------------------------------------------
needs_passt = pytest.mark.skipif(not os.path.exists("/usr/bin/passt"), reason="no passt")


@needs_passt
def test_passt_forwards_a_host_port_to_the_guest():
    from vmm.net.passt import PasstBackend
    port = free_port()
    with PasstBackend(MAC, [Publish("tcp", "127.0.0.1", port, 8080)]) as b:
        assert passt_pids(f"/{port}:8080") == [b.pid]
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        # passt turns the connection into a SYN to the guest's port 8080 (it first
        # resolves the guest's MAC: an ARP request may come before).
        deadline, syn = time.monotonic() + 5, None
        while syn is None and time.monotonic() < deadline:
            select.select([b.fileno()], [], [], 0.5)
            for f in b.receive():
                if f[12:14] == b"\x08\x00" and f[23] == 6:  # IPv4, TCP
                    ihl = (f[14] & 0xF) * 4
                    dport, = struct.unpack_from("!H", f, 14 + ihl + 2)
                    flags = f[14 + ihl + 13]
                    if dport == 8080 and flags & 0x02:
                        syn = f
        c.close()
        assert syn is not None and syn[:6] == MAC
    assert wait_gone(f"/{port}:8080")


@needs_passt
def test_passt_port_in_use_is_one_line_and_leaves_nothing():
    from vmm.net.passt import PasstBackend
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(NetError) as e:
            PasstBackend(MAC, [Publish("tcp", "127.0.0.1", port, 80)])
    msg = str(e.value)
    assert "\n" not in msg and f"--publish 127.0.0.1:{port}:80/tcp" in msg and "in use" in msg
    assert not passt_pids(f"/{port}:80")


@needs_passt
def test_two_passts_at_once():
    from vmm.net.passt import PasstBackend
    a_cfg, b_cfg = parse_net("user"), parse_net("user")
    assert a_cfg.mac != b_cfg.mac
    with PasstBackend(a_cfg.mac) as a, PasstBackend(b_cfg.mac) as b:
        assert a.pid != b.pid and a.proc.poll() is None and b.proc.poll() is None
        a.send([b"\xff" * 6 + a_cfg.mac + b"\x88\xb5" + bytes(46)])  # both serve frames
        b.send([b"\xff" * 6 + b_cfg.mac + b"\x88\xb5" + bytes(46)])


def test_passt_missing(monkeypatch, tmp_path):
    from vmm.net.passt import PasstBackend
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NetError, match="needs passt"):
        PasstBackend(MAC)


@needs_passt
def test_passt_ends_with_its_parent_killed():
    port = free_port()
    code = ("import sys, time; from vmm.net.passt import PasstBackend; from vmm.net import Publish;"
            f"b = PasstBackend(bytes.fromhex('525400000001'), [Publish('tcp', '127.0.0.1', {port}, 80)]);"
            "print(b.pid, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        assert passt_pids(f"/{port}:80") == [pid]
        p.kill()
        p.wait()
        assert wait_gone(f"/{port}:80")
    finally:
        p.kill()
        p.wait()


# --- TAP ------------------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="a TAP device needs root and /dev/net/tun")


@needs_root
def test_tap_frames_both_ways():
    from vmm.net.tap import TapBackend
    name = f"pyvt{os.getpid() % 100000}"
    with TapBackend(name) as t:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        try:
            s.bind((name, 0))
            s.settimeout(5)
            out = b"\xff" * 6 + MAC + b"\x88\xb5" + b"to the host".ljust(46, b"\0")
            t.send([out])
            while s.recv(70000) != out:
                pass
            into = MAC + bytes.fromhex("02aabbccddee") + b"\x88\xb5" + b"to the guest".ljust(46, b"\0")
            s.send(into)
            got = []
            deadline = time.monotonic() + 5
            while into not in got and time.monotonic() < deadline:
                select.select([t.fileno()], [], [], 0.5)
                got += t.receive()
            assert into in got
        finally:
            s.close()
    assert subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0


@needs_root
def test_tap_that_cannot_be_opened():
    from vmm.net.tap import TapBackend
    with pytest.raises(NetError) as e:
        TapBackend("lo")  # not a TAP device
    assert "tap=lo" in str(e.value) and "\n" not in str(e.value)


def test_socketpair_backend_round_trip():
    with base.SocketpairBackend() as b:
        b.send([b"x" * 60, b"x" * 40])
        assert base.peer_recv(b.peer) == b"x" * 100
        base.peer_send(b.peer, b"y" * 70)
        select.select([b.fileno()], [], [], 5)
        assert b.receive() == [b"y" * 70]
        b.peer.close()
        b.peer = None
        with pytest.raises(EOFError):
            b.receive()
