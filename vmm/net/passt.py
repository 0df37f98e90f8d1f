"""``--net user``: Debian's passt as a child process, over a socketpair (``passt --fd``).

passt (https://passt.top) gives the guest DHCP, DNS, NAT to the host's sockets and
a path to the host's loopback (the guest's gateway address maps to the host), all as an
unprivileged process; it speaks qemu's stream framing (a 4-byte big-endian length, then
the Ethernet frame: vmm/net/base.py StreamSocketBackend). ``--publish`` becomes passt's
``-t``/``-u`` port forwarding.

Bound to the VM's lifetime: passt runs in the foreground on one end of a socketpair
whose other end only pyvmm holds (close-on-exec), and passt exits when that end closes
(EOF) -- also when pyvmm is killed with SIGKILL, which closes it. As a second line,
the child is started with PR_SET_PDEATHSIG=SIGKILL (kept when pyvmm is not root; passt
run as root drops to ``nobody``, which clears it, and the EOF remains).

Ready means passt is in its main loop, every forwarded port bound: pyvmm sends one ARP
probe (§ RFC 5227 style, sender address 0.0.0.0) from the guest's MAC and waits for the
reply, or for passt to exit (a port in use, a bad option: its last message becomes the
error), at most START_TIMEOUT_S.
"""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import time

from vmm.net.base import NetError, StreamSocketBackend, frame_header

#: How long passt may take to be ready.
START_TIMEOUT_S = 10.0
#: The address the readiness probe asks for (link-local; passt answers any but the
#: guest's own, see passt's arp.c).
PROBE_TARGET = bytes((169, 254, 255, 254))
_PR_SET_PDEATHSIG = 1
#: The MTU passt tells the guest (DHCP/NDP): its default, 65520, needs rx buffers the
#: device does not ask for (no VIRTIO_NET_F_MRG_RXBUF or GUEST_TSO offered), and Linux's
#: driver then posts 1518-byte buffers: bigger frames would be dropped (rx_too_big).
GUEST_MTU = 1500
#: The guest's side of ``--net user`` (the addresses QEMU's user networking uses, so
#: they are familiar): passt is told them (-a/-n/-g/--dns-forward) and the guest gets
#: them on its command line (``pyvmm.net=``, read by guests/initramfs/init), so no DHCP
#: client runs. passt maps the gateway address to the host's loopback (its default,
#: see --no-map-gw in passt(1)): the guest reaches a host service on 127.0.0.1:PORT at
#: GUEST_GATEWAY:PORT. DNS queries to GUEST_DNS go to the host's resolver.
GUEST_ADDR = "10.0.2.15"
GUEST_PREFIX = 24
GUEST_GATEWAY = "10.0.2.2"
GUEST_DNS = "10.0.2.3"
#: passt's options for those addresses; IPv4 only (the guest kernel has no IPv6).
GUEST_ARGS = ("-4", "-a", GUEST_ADDR, "-n", str(GUEST_PREFIX), "-g", GUEST_GATEWAY,
              "--dns-forward", GUEST_DNS)


def passt_path() -> str:
    """Where passt is (PATH), or NetError saying how to get it."""
    path = shutil.which("passt")
    if path is None:
        raise NetError("--net user needs passt, which is not installed "
                       "(apt install passt), or use --net none")
    return path


def passt_args(publish) -> list[str]:
    """passt's port-forwarding options for ``publish`` (vmm.net.Publish)."""
    args = []
    for p in publish:
        spec = f"{p.host_port}:{p.guest_port}"
        if p.host_addr:
            spec = f"{p.host_addr}/{spec}"
        args += ["-t" if p.proto == "tcp" else "-u", spec]
    return args


def arp_probe(mac: bytes) -> bytes:
    """An ARP request for PROBE_TARGET from ``mac``, sender IP 0.0.0.0 (RFC 826)."""
    return (b"\xff" * 6 + mac + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + bytes(4) + bytes(6) + PROBE_TARGET)


def _death_signal():
    """A preexec function setting PR_SET_PDEATHSIG (resolved before the fork)."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sig = int(signal.SIGKILL)
    return lambda: prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


class PasstBackend(StreamSocketBackend):
    """A started, ready passt for one NIC.

    Args:
        mac: the guest's MAC (the readiness probe's source).
        publish: vmm.net.Publish entries to forward.
    Raises:
        NetError: passt is missing, exits (port in use, bad option) or is not ready
            within START_TIMEOUT_S; nothing is left running.
    """

    name = "passt"
    guest_cmdline = f"pyvmm.net={GUEST_ADDR}/{GUEST_PREFIX},{GUEST_GATEWAY},{GUEST_DNS}"

    def __init__(self, mac: bytes, publish=()):
        import subprocess
        import tempfile
        path = passt_path()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        super().__init__(ours)
        self.proc = None
        log = tempfile.TemporaryFile()
        try:
            cmd = [path, "--foreground", "--quiet", "--fd", str(theirs.fileno()),
                   "--mtu", str(GUEST_MTU), *GUEST_ARGS, *passt_args(publish)]
            try:
                self.proc = subprocess.Popen(
                    cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_death_signal())
            except OSError as e:
                raise NetError(f"cannot start passt ({path}): {e.strerror}") from None
            finally:
                theirs.close()
            self._wait_ready(mac, log, publish)
        except BaseException:
            self.close()
            raise
        finally:
            log.close()

    def _wait_ready(self, mac: bytes, log, publish) -> None:
        self.sock.sendall(frame_header(42) + arp_probe(mac))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetError(f"passt did not start within {START_TIMEOUT_S:.0f} s")
            self.sock.settimeout(min(left, 0.05))
            try:
                data = self.sock.recv(4096, socket.MSG_PEEK)
            except socket.timeout:
                data = None
            except ConnectionError:
                data = b""
            finally:
                self.sock.settimeout(None)
            if data == b"" or self.proc.poll() is not None:
                self.proc.wait()
                raise NetError(self._failure(log, publish))
            if data:
                # The ARP reply (and anything else passt sent so soon) is for nobody.
                for _ in self.receive():
                    pass
                return

    def _failure(self, log, publish) -> str:
        log.seek(0)
        lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and "syslog" not in ln
                 and not ln.startswith("Don't run as root")]
        why = lines[-1] if lines else f"exit status {self.proc.returncode}"
        if "bind" in why.lower() and publish:
            pubs = " ".join(f"--publish {p}" for p in publish)
            return f"passt cannot forward {pubs}: {why} (a port already in use?)"
        return f"passt failed: {why}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def close(self) -> None:
        super().close()  # passt sees EOF and exits
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(1.0)
            except Exception:  # noqa: BLE001 - then make sure
                proc.kill()
                proc.wait()


__all__ = ["PasstBackend", "passt_path", "passt_args", "arp_probe", "GUEST_ADDR",
           "GUEST_PREFIX", "GUEST_GATEWAY", "GUEST_DNS"]
