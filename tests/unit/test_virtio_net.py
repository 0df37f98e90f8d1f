"""virtio-net (vmm/devices/virtio/net.py) behind the mmio transport, without a VM.

MmioDriver (test_virtio_mmio.py) negotiates and sets up both queues through the
registers; frames are laid out in a real GuestMemory; the backend is a real socketpair
(vmm/net/base.py SocketpairBackend) whose peer end the test reads and writes.
"""

from __future__ import annotations

import select
import struct

import pytest

from vmm.devices.virtio import mmio as M
from vmm.devices.virtio import net as N
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.memory import GuestMemory
from vmm.net.base import MAX_FRAME, SocketpairBackend, StreamFramer, peer_recv, peer_send

try:
    from .test_virtio_mmio import MmioDriver
    from .test_virtio_queue import MEM_SIZE, Buffers, Rings
except ImportError:  # tests/unit is not a package
    from test_virtio_mmio import MmioDriver
    from test_virtio_queue import MEM_SIZE, Buffers, Rings

MAC = bytes.fromhex("525400abcdef")
TX_DESC, TX_AVAIL, TX_USED = 0x40000, 0x50000, 0x60000
HDR = bytes(12)


def frame(n: int, seed: int = 1) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


class Env:
    def __init__(self, mem, *, size: int = 16):
        self.backend = SocketpairBackend()
        self.peer = self.backend.peer
        self.peer.settimeout(5)
        self.dev = N.VirtioNet(self.backend, MAC)
        self.mem = mem
        self.irqs = []
        self.t = M.VirtioMmioTransport(self.dev, mem, lambda: self.irqs.append(1))
        self.dev.request_rx = lambda: self.t.notify(N.RX_QUEUE)
        self.d = MmioDriver(self.t, mem)
        self.buf = Buffers(mem)
        self.size = size
        self.start()

    def start(self):
        assert self.d.negotiate()
        assert self.d.setup_queue(0, self.size)
        self.rx = self.d.rings
        assert self.d.setup_queue(1, self.size, TX_DESC, TX_AVAIL, TX_USED)
        self.tx = self.d.rings
        self.d.driver_ok()
        assert self.t.status & M.STATUS_DRIVER_OK

    def send(self, data: bytes, *, pieces: list[int] | None = None, writable=False) -> int:
        """Queue one tx chain of ``data`` (split at ``pieces``) and notify; returns head."""
        bufs, pos = [], 0
        for n in (pieces or [len(data)]):
            chunk = data[pos:pos + n]
            pos += n
            bufs.append((self.buf.alloc(len(chunk), chunk), len(chunk), writable))
        head = self.tx.chain(bufs)
        self.tx.publish(head)
        self.t.write(M.QUEUE_NOTIFY_OFFSET, 4, 1)
        return head

    def post_rx(self, sizes: list[int], notify: bool = True) -> tuple[int, list]:
        bufs = [(self.buf.alloc(n, b"\xee" * n), n, True) for n in sizes]
        head = self.rx.chain(bufs)
        self.rx.publish(head)
        if notify:
            self.t.write(M.QUEUE_NOTIFY_OFFSET, 4, 0)
        return head, bufs

    def read_rx(self, bufs, n: int) -> bytes:
        return b"".join(self.mem.read(a, ln) for a, ln, _ in bufs)[:n]

    def pump(self, timeout: float = 5.0) -> None:
        """What the I/O thread does when the backend's fd is readable."""
        r, _, _ = select.select([self.backend.fileno()], [], [], timeout)
        assert r, "no frame arrived from the peer"
        self.dev.on_readable()

    def no_frame_at_peer(self) -> bool:
        r, _, _ = select.select([self.peer], [], [], 0.05)
        return not r

    def close(self):
        self.dev.close()


@pytest.fixture
def env(mem):
    e = Env(mem)
    yield e
    e.close()


# --- identity, features, config (§5.1.3, §5.1.4) -----------------------------------------
def test_device_id_and_features(env):
    assert env.t.read(M.DEVICE_ID_OFFSET, 4) == 1
    f = env.d.device_features()
    for bit in (32, N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS):
        assert f >> bit & 1
    for bit in (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_MRG_RXBUF,
                N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_MQ):
        assert not f >> bit & 1
    assert env.t.read(M.QUEUE_NUM_MAX_OFFSET, 4) == N.QUEUE_SIZE


def test_config_mac_and_link_status(env):
    assert bytes(env.t.read(0x100 + i, 1) for i in range(6)) == MAC
    assert env.t.read(0x100, 4) == int.from_bytes(MAC[:4], "little")
    assert env.t.read(0x106, 2) == N.VIRTIO_NET_S_LINK_UP
    env.dev.link_up = False
    assert env.t.read(0x106, 2) == 0
    assert env.t.read(0x107, 1) == 0 and env.t.read(0x110, 4) == 0  # bad width, beyond


def test_mac_must_be_unicast():
    with SocketpairBackend() as b:
        with pytest.raises(ValueError):
            N.VirtioNet(b, bytes.fromhex("010203040506"))
        with pytest.raises(ValueError):
            N.VirtioNet(b, b"\x02\x00")
    assert N.parse_mac("52:54:00:ab:cd:ef") == MAC
    with pytest.raises(ValueError):
        N.parse_mac("52:54:00:ab:cd")
    with pytest.raises(ValueError):
        N.parse_mac("01:54:00:ab:cd:ef")


# --- tx (§5.1.6.2) ---------------------------------------------------------------------------
def test_tx_one_buffer(env):
    f = frame(60)
    head = env.send(HDR + f)
    assert peer_recv(env.peer) == f
    assert env.tx.take_used() == [(head, 0)]
    assert env.irqs and env.dev.stats["tx_frames"] == 1 and env.dev.stats["tx_bytes"] == 60


def test_tx_header_and_frame_split_anywhere(env):
    f = frame(1514, 7)
    env.send(HDR + f, pieces=[12, 100, 1414])
    env.send(HDR + f, pieces=[5, 7 + 14, 1500])
    assert peer_recv(env.peer) == f and peer_recv(env.peer) == f
    assert env.dev.stats["tx_frames"] == 2


def test_tx_64k_frame(env):
    f = frame(MAX_FRAME, 3)
    env.send(HDR + f, pieces=[HDR.__len__(), 32768, MAX_FRAME - 32768])
    assert peer_recv(env.peer) == f


def test_tx_oversized_dropped_and_counted(env):
    head = env.send(HDR + frame(MAX_FRAME + 1), pieces=[12, 40000, MAX_FRAME + 1 - 40000])
    assert env.tx.take_used() == [(head, 0)]
    assert env.dev.stats["tx_oversized"] == 1 and env.no_frame_at_peer()
    env.send(HDR + frame(42))  # the device still works
    assert peer_recv(env.peer) == frame(42)


@pytest.mark.parametrize("case", ["short", "writable", "loop", "outside"])
def test_tx_malformed_dropped_and_counted(env, case):
    if case == "short":
        head = env.send(b"\0" * 11)
    elif case == "writable":
        head = env.send(HDR + frame(60), writable=True)
    else:
        a = env.buf.alloc(72, HDR + frame(60))
        if case == "loop":
            env.tx.set_desc(0, a, 72, VIRTQ_DESC_F_NEXT, 0)  # points at itself
        else:
            env.tx.set_desc(0, MEM_SIZE + 0x1000, 72, 0)
        head = 0
        env.tx.next_desc = 1
        env.tx.publish(0)
        env.t.write(M.QUEUE_NOTIFY_OFFSET, 4, 1)
    assert env.tx.take_used() == [(head, 0)]
    assert env.dev.stats["tx_malformed"] == 1 and env.dev.stats["tx_frames"] == 0
    assert env.no_frame_at_peer()
    assert not env.t.status & M.STATUS_DEVICE_NEEDS_RESET


def test_tx_backend_error_counted(env):
    env.peer.close()
    env.backend.peer = None
    env.send(HDR + frame(60))
    assert env.dev.stats["tx_errors"] == 1
    assert not env.t.status & M.STATUS_DEVICE_NEEDS_RESET


# --- rx (§5.1.6.3, §5.1.6.4) ---------------------------------------------------------------
def test_rx_header_and_frame(env):
    head, bufs = env.post_rx([1526])
    f = frame(1514, 9)
    peer_send(env.peer, f)
    env.pump()
    used = env.rx.take_used()
    assert used == [(head, 12 + 1514)]
    data = env.read_rx(bufs, 12 + 1514)
    flags, gso, hdr_len, gso_size, cs, co, nbuf = struct.unpack("<BBHHHHH", data[:12])
    assert (flags, gso, hdr_len, gso_size, cs, co, nbuf) == (0, 0, 0, 0, 0, 0, 1)
    assert data[12:] == f
    assert env.irqs and env.dev.stats["rx_frames"] == 1


def test_rx_split_buffers(env):
    head, bufs = env.post_rx([10, 2, 100, 4000])
    f = frame(3000, 2)
    peer_send(env.peer, f)
    env.pump()
    assert env.rx.take_used() == [(head, 3012)]
    assert env.read_rx(bufs, 3012) == N.RX_HEADER + f


def test_rx_frame_too_big_for_buffer(env):
    head, _ = env.post_rx([100])
    peer_send(env.peer, frame(200))
    env.pump()
    assert env.rx.take_used() == [(head, 0)]
    assert env.dev.stats["rx_too_big"] == 1


def test_rx_malformed_chain(env):
    a = env.buf.alloc(64)
    env.rx.set_desc(0, a, 64, 0)  # device-readable: not an rx buffer
    env.rx.next_desc = 1
    env.rx.publish(0)
    peer_send(env.peer, frame(40))
    env.pump()
    assert env.rx.take_used() == [(0, 0)]
    assert env.dev.stats["rx_malformed"] == 1


def test_rx_waits_for_buffers_then_delivers(env):
    for i in range(3):
        peer_send(env.peer, frame(60, i))
    env.pump()
    assert env.rx.take_used() == []  # no buffers posted yet
    posted = [env.post_rx([1526], notify=False) for _ in range(3)]
    env.t.write(M.QUEUE_NOTIFY_OFFSET, 4, 0)  # the driver kicks the rx queue
    used = env.rx.take_used()
    assert [u[0] for u in used] == [h for h, _ in posted]
    for i, (_, bufs) in enumerate(posted):
        assert env.read_rx(bufs, 72)[12:] == frame(60, i)


def test_rx_backlog_bounded_drops_counted(env):
    n = N.RX_BACKLOG + 10
    for i in range(n):
        peer_send(env.peer, frame(20, i))
    while env.dev.stats["rx_no_buffer"] + len(env.dev._backlog) < n:
        env.pump()
    assert len(env.dev._backlog) == N.RX_BACKLOG
    assert env.dev.stats["rx_no_buffer"] == 10


def test_queue_reset_drops_backlog_and_restarts(env):
    peer_send(env.peer, frame(60))
    env.pump()
    env.t.write(M.STATUS_OFFSET, 4, 0)  # device reset (§2.4)
    assert env.t.status == 0 and not env.dev._backlog
    assert env.dev.stats["rx_no_buffer"] == 1
    env.rx.last_used = env.tx.last_used = 0
    env.rx.avail_idx = env.tx.avail_idx = 0
    env.rx.next_desc = env.tx.next_desc = 0
    for r in (env.rx, env.tx):  # fresh rings, as a driver sets them up again
        env.mem.write(r.avail, bytes(4))
        env.mem.write(r.used, bytes(4))
    env.start()
    env.send(HDR + frame(50))
    assert peer_recv(env.peer) == frame(50)
    head, bufs = env.post_rx([200])
    peer_send(env.peer, frame(70))
    env.pump()
    assert env.rx.take_used() == [(head, 82)]


def test_broken_rx_ring_needs_reset_not_crash(env):
    env.rx.set_avail_idx(env.size + 5)  # §2.7.6: more than queue-size ahead
    peer_send(env.peer, frame(60))
    env.pump()
    assert env.t.status & M.STATUS_DEVICE_NEEDS_RESET


def test_backend_eof_stops_rx(env):
    env.peer.close()
    env.backend.peer = None
    env.pump()
    assert env.dev.backend_gone
    env.dev.on_readable()  # harmless afterwards


def test_rx_before_driver_ok_dropped_quietly(mem, caplog):
    with SocketpairBackend() as b:
        dev = N.VirtioNet(b, MAC)
        t = M.VirtioMmioTransport(dev, mem, lambda: None)
        notified = []
        dev.request_rx = lambda: notified.append(1)
        peer_send(b.peer, frame(60))
        select.select([b.fileno()], [], [], 5)
        dev.on_readable()
        assert not dev._backlog and dev.stats["rx_no_buffer"] == 1 and not notified
        assert t.status == 0


# --- snapshot state ----------------------------------------------------------------------------
def test_save_restore(env, mem):
    state = env.dev.save()
    with SocketpairBackend() as b:
        other = N.VirtioNet(b, bytes.fromhex("525400000001"))
        other.restore(state)
        assert other.mac == MAC
        bad = dict(state, features=state["features"] | 1)
        with pytest.raises(N.DeviceStateError):
            other.restore(bad)
        with pytest.raises(N.DeviceStateError):
            other.restore(dict(state, mac=b"\x01" * 6))
        with pytest.raises(N.DeviceStateError):
            other.restore(dict(state, mac=b"\x02"))


def test_transport_save_restore_round_trip(env, mem):
    state = env.t.save()
    with SocketpairBackend() as b:
        dev = N.VirtioNet(b, bytes.fromhex("525400000002"))
        t = M.VirtioMmioTransport(dev, mem, lambda: None)
        t.restore(state)
        assert dev.mac == MAC and t.status & M.STATUS_DRIVER_OK


# --- framing (vmm/net/base.py) -----------------------------------------------------------------
def test_stream_framer():
    fr = StreamFramer()
    data = struct.pack("!I", 3) + b"abc" + struct.pack("!I", 5) + b"de"
    fr.feed(data)
    assert fr.frames() == [b"abc"]
    fr.feed(b"fgh")
    assert fr.frames() == [b"defgh"]
    fr.feed(struct.pack("!I", MAX_FRAME + 1))
    with pytest.raises(ValueError):
        fr.frames()


def test_stream_framer_push_keeps_partial_frames():
    fr = StreamFramer()
    one = struct.pack("!I", 4) + b"wxyz"
    two = struct.pack("!I", 6) + b"abcdef"
    assert fr.push(one + two[:5]) == [b"wxyz"]   # nothing held: parsed from the read
    assert fr.push(two[5:7]) == []
    assert fr.push(two[7:] + one) == [b"abcdef", b"wxyz"]
    assert fr.push(b"") == []
