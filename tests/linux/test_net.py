"""The default Linux guest on the network (``--net user``: passt, vmm/net/passt.py).

The guest gets its address from the kernel command line (``pyvmm.net=``, set up by
guests/initramfs/init) and reaches the host's loopback at the gateway address (passt's
gateway mapping). What is shown here: a download from an HTTP server on the host's
127.0.0.1 with a matching sha256; a host client reaching a server in the guest through
``--publish``; two VMs on the network at once; ``pyvmm boot --net user`` killed with
SIGKILL leaves no passt behind. Three boots (one shared by two tests).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.linux.conftest import BOOT_TIMEOUT_S, pyvmm_command
from vmm.net.passt import GUEST_ADDR, GUEST_GATEWAY

pytestmark = pytest.mark.linux

CMD_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A directory with a 300 KiB file of random bytes, served on 127.0.0.1 by a
    python http.server for the module: (directory, port, sha256 of the file)."""
    root = tmp_path_factory.mktemp("www")
    data = os.urandom(300 * 1024)
    (root / "blob").write_bytes(data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield root, server.server_address[1], hashlib.sha256(data).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def published_port():
    return free_port()


@pytest.fixture(scope="module")
def net_guest(default_guest, published_port):
    """One default guest with --net user and host 127.0.0.1:PORT -> guest 8080."""
    from vmm import Guest
    with Guest(net="user", publish=[f"127.0.0.1:{published_port}:8080"],
               boot_timeout=BOOT_TIMEOUT_S) as g:
        yield g


def download(guest, port: int) -> str:
    r = guest.run(f"wget -q -O /tmp/blob http://{GUEST_GATEWAY}:{port}/blob "
                  "&& sha256sum /tmp/blob", timeout=CMD_TIMEOUT_S)
    assert r.exit_code == 0, (r, guest.console_tail().decode(errors="replace"))
    return r.stdout.decode().split()[0]


def test_guest_downloads_from_host_loopback(net_guest, http_root):
    _, port, digest = http_root
    r = net_guest.run("ifconfig eth0; route -n; cat /etc/resolv.conf", timeout=CMD_TIMEOUT_S)
    out = r.stdout.decode()
    assert f"inet addr:{GUEST_ADDR}" in out and GUEST_GATEWAY in out, out
    assert download(net_guest, port) == digest


def test_host_reaches_guest_server_through_publish(net_guest, published_port):
    body = os.urandom(16).hex()
    r = net_guest.run(f"mkdir -p /tmp/www && echo {body} > /tmp/www/index.html "
                      "&& httpd -p 8080 -h /tmp/www", timeout=CMD_TIMEOUT_S)
    assert r.exit_code == 0, r
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{published_port}/index.html",
                                        timeout=60) as resp:
                assert resp.read().decode().strip() == body
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_two_vms_on_the_network_at_once(net_guest, http_root):
    from vmm import Guest
    _, port, digest = http_root
    with Guest(net="user", boot_timeout=BOOT_TIMEOUT_S) as other:
        results = {}

        def fetch(name, g):
            results[name] = download(g, port)

        threads = [threading.Thread(target=fetch, args=(n, g))
                   for n, g in (("first", net_guest), ("second", other))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CMD_TIMEOUT_S + 30)
        assert results == {"first": digest, "second": digest}
        macs = {g.run("cat /sys/class/net/eth0/address", timeout=CMD_TIMEOUT_S).stdout
                for g in (net_guest, other)}
        assert len(macs) == 2, macs


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_pyvmm_leaves_no_passt(default_guest):
    proc = subprocess.Popen([*pyvmm_command(), "boot", "--net", "user",
                             "--timeout", str(BOOT_TIMEOUT_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    passt = []
    try:
        seen = b""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while b"pyvmm: ready" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen[-2000:]
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            seen += chunk
        assert b"pyvmm: ready" in seen, seen[-2000:]
        # Debian's passt re-executes itself as passt.avx2 where AVX2 is there.
        passt = [p for p in _children(proc.pid)
                 if open(f"/proc/{p}/comm").read().startswith("passt")]
        assert passt, "no passt child of pyvmm"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while any(map(_alive, passt)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, passt)), f"passt {passt} outlived pyvmm"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in passt:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
