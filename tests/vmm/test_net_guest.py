"""virtio-net in a VM: the bare-metal driver guest (guests/tiny/netbench.c) sends frames
to and receives them from a socketpair peer, under both run loops; the backend's fd is
served by the I/O thread (Machine.attach_nic)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import requires_kvm
from vmm.devices.virtio import mmio as M
from vmm.machine import ExitReason, Machine, MachineConfig
from vmm.net.base import SocketpairBackend, StreamFramer, frame_header

pytestmark = requires_kvm
MAC = bytes.fromhex("525400000003")


def make_frame(size: int, seq: int) -> bytes:
    head = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5" + seq.to_bytes(4, "little")
    return head + bytes((i * 7) & 0xFF for i in range(size - len(head)))


class RecordingBackend(SocketpairBackend):
    """A socketpair backend that notes which threads call it."""

    def __init__(self):
        super().__init__()
        self.threads = set()

    def receive(self):
        self.threads.add(threading.current_thread().name)
        return super().receive()

    def send(self, pieces):
        self.threads.add(threading.current_thread().name)
        return super().send(pieces)


def boot(tiny, loop, mode, size, count, peer_main):
    guest = tiny("netbench", {"MODE": int(mode == "rx"), "FRAME": size, "COUNT": count,
                              "QD": 8})
    out = bytearray()
    backend = RecordingBackend()
    peer = backend.peer
    peer.settimeout(30)
    with Machine(MachineConfig(kernel=guest, mem_size=64 << 20, loop=loop,
                               console=out.extend)) as m:
        nic = m.attach_nic(backend, MAC)
        stop = threading.Event()
        t = threading.Thread(target=peer_main, args=(peer, m.virtio[-1].transport, stop),
                             daemon=True)
        t.start()
        try:
            result = m.run(timeout=60)
        finally:
            stop.set()
        t.join(10)
        stats = dict(nic.stats)
    assert result.reason is ExitReason.DEBUG_EXIT and result.status == 0, (result, out)
    assert backend.threads == {"io"}  # never a vCPU thread
    return bytes(out), stats


@pytest.mark.parametrize("loop", ["shim", "python"])
@pytest.mark.parametrize("size", [60, 1514, 65550])
def test_guest_transmits(tiny, loop, size):
    got = []

    def peer_main(peer, transport, stop):
        framer = StreamFramer()
        while len(got) < 50:
            data = peer.recv(1 << 18)
            if not data:
                return
            framer.feed(data)
            got.extend(framer.frames())

    out, stats = boot(tiny, loop, "tx", size, 50, peer_main)
    assert f"netbench mode=0 frames=50 bytes={50 * size}".encode() in out
    assert len(got) == 50 and stats["tx_frames"] == 50
    for seq, f in enumerate(got):
        assert len(f) == size and f[:14] == b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5"
        assert int.from_bytes(f[14:18], "little") == seq


@pytest.mark.parametrize("loop", ["shim", "python"])
@pytest.mark.parametrize("size", [60, 65550])
def test_guest_receives(tiny, loop, size):
    def peer_main(peer, transport, stop):
        while not transport.status & M.STATUS_DRIVER_OK:
            if stop.wait(0.001):
                return
        try:
            for seq in range(40):
                peer.sendall(frame_header(size) + make_frame(size, seq))
            while not stop.wait(0.005):
                peer.sendall(frame_header(size) + make_frame(size, 0xFFFFFFFF))
        except OSError:
            pass

    out, stats = boot(tiny, loop, "rx", size, 0, peer_main)
    frames = int(out.split(b"frames=")[1].split()[0])
    # The guest checks each length and that sequence numbers only increase; it keeps 8
    # buffers posted, the device a backlog of 256 frames: none is lost here.
    assert frames == 40 and stats["rx_no_buffer"] == 0
    assert stats["rx_frames"] >= 41
