"""The interface between virtio-net (vmm/devices/virtio/net.py) and where frames go.

A backend moves whole Ethernet frames (no virtio_net_hdr: the device model strips and
adds it) between the guest's NIC and something on the host: passt (passt.py), a TAP
device (tap.py), or, in tests, a socketpair peer (:class:`SocketpairBackend`).

The machine waits on :meth:`NetBackend.fileno` on its I/O thread
(``IoThread.add_reader``) and calls the device's ``on_readable``, which calls
:meth:`NetBackend.receive`; transmitted frames are handed to :meth:`NetBackend.send`
on the same thread. A backend never touches guest memory, and the device model never
touches a socket or a file descriptor.
"""

from __future__ import annotations

import socket
import struct

from vmm.errors import UserError

#: Largest Ethernet frame a backend carries (without the 12-byte virtio_net_hdr_v1):
#: the device bounds a whole buffer, header included, to 65562 bytes.
MAX_FRAME = 65550

#: Frames one ``receive()`` of a datagram-like fd (TAP) reads at most: the I/O thread
#: serves other fds too.
RECEIVE_BATCH = 64


class NetError(UserError):
    """A network backend cannot be set up as asked (one line, meant for the user)."""


class NetBackend:
    """What a virtio-net device needs from a backend (subclasses implement it).

    Methods:
        fileno(): a fd that is readable when :meth:`receive` has something, or -1
            (nothing ever arrives: ``--net none`` style backends).
        receive(): frames (bytes) that arrived, possibly none, at most what one read
            of the fd brings (a bounded list); never blocks. Raises EOFError when the peer is gone for good.
        send(pieces): transmit one Ethernet frame (<= MAX_FRAME bytes) given as a list
            of bytes-like pieces (views of guest memory, valid during the call only);
            raises OSError when it cannot (the device counts it as a tx error).
        close(): release everything (idempotent).

    Attributes:
        guest_cmdline: a kernel command-line word telling the guest how to set up its
            interface (the default guest's /init reads ``pyvmm.net=``), or "".
    """

    name = "backend"
    guest_cmdline = ""

    def fileno(self) -> int:
        return -1

    def receive(self) -> list[bytes]:
        return []

    def send(self, pieces: list) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullBackend(NetBackend):
    """A NIC with nothing behind it: frames sent are dropped, none arrive."""

    name = "none"

    def send(self, pieces: list) -> None:
        pass


_LEN = struct.Struct("!I")


class StreamFramer:
    """qemu's stream framing (also passt's): a 4-byte big-endian length, then the frame.

    ``feed`` bytes as they arrive; complete frames come out of :meth:`frames`. A length
    above MAX_FRAME (or zero) means the stream is broken: ``ValueError``. Holds at most
    one partial frame plus what one read brought, so it is bounded.
    """

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data) -> None:
        self._buf += data

    def frames(self) -> list[bytes]:
        return self.push(b"")

    def push(self, data) -> list[bytes]:
        """Feed ``data`` and return the frames it completed (each copied once)."""
        if self._buf:
            self._buf += data
            src = self._buf
        else:
            src = data  # nothing held: parse the read's own bytes, keep only the tail
        out = []
        total = len(src)
        pos = 0
        with memoryview(src) as mv:
            while total - pos >= 4:
                (n,) = _LEN.unpack_from(src, pos)
                if n == 0 or n > MAX_FRAME:
                    raise ValueError(f"frame length {n} is outside 1..{MAX_FRAME}")
                if total - pos - 4 < n:
                    break
                out.append(bytes(mv[pos + 4:pos + 4 + n]))
                pos += 4 + n
            tail = bytearray(mv[pos:]) if src is not self._buf and pos < total else None
        if src is self._buf:
            if pos:
                del self._buf[:pos]
        elif tail is not None:
            self._buf = tail
        return out


def frame_header(n: int) -> bytes:
    return _LEN.pack(n)


class StreamSocketBackend(NetBackend):
    """Frames over a connected SOCK_STREAM unix socket, qemu/passt framing.

    The socket stays blocking for sends (a busy peer slows the sender down rather than
    splitting a frame) and is read with MSG_DONTWAIT.
    """

    name = "stream"
    #: Bytes read per recv; a 64 KiB frame plus its length fits in one read.
    READ_SIZE = 256 << 10

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._framer = StreamFramer()
        self._rbuf = bytearray(self.READ_SIZE)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def receive(self) -> list[bytes]:
        """The frames completed by one read of at most READ_SIZE bytes."""
        buf = self._rbuf
        try:
            n = self.sock.recv_into(buf, self.READ_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError as e:
            raise EOFError(f"{self.name}: {e.strerror}") from None
        if not n:
            raise EOFError(f"{self.name}: the peer closed the connection")
        # Into one reused, already-faulted buffer: a fresh 256 KiB object per read
        # would be a new mapping, page-faulted on every read.
        with memoryview(buf) as mv, mv[:n] as data:
            try:
                return self._framer.push(data)
            except ValueError as e:
                raise EOFError(f"{self.name}: broken stream ({e})") from None

    def send(self, pieces: list) -> None:
        n = sum(map(len, pieces))
        # sendmsg may send part of it (a signal, a full buffer on a blocking socket is
        # waited out); the rest goes after it so the stream stays framed.
        sent = self.sock.sendmsg([frame_header(n), *pieces])
        if sent < n + 4:
            rest = b"".join([frame_header(n), *pieces])[sent:]
            self.sock.sendall(rest)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SocketpairBackend(StreamSocketBackend):
    """One end of a socketpair; :attr:`peer` is the other (tests, benchmarks)."""

    name = "socketpair"

    def __init__(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        super().__init__(a)
        self.peer = b

    def close(self) -> None:
        super().close()
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def peer_send(sock: socket.socket, frame: bytes) -> None:
    """Send one frame to a StreamSocketBackend from its peer (tests, benchmarks)."""
    sock.sendall(frame_header(len(frame)) + frame)


def peer_recv(sock: socket.socket) -> bytes:
    """Read one frame from a StreamSocketBackend's peer socket (blocking)."""
    hdr = _recv_exact(sock, 4)
    return _recv_exact(sock, _LEN.unpack(hdr)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return bytes(buf)


__all__ = ["MAX_FRAME", "RECEIVE_BATCH", "NetError", "NetBackend", "NullBackend",
           "StreamFramer", "StreamSocketBackend", "SocketpairBackend", "peer_send",
           "peer_recv"]
