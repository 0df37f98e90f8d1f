"""virtio-net device model (virtio 1.2 §5.1): virtio only, the frames are a backend's.

Two queues (§5.1.2): receiveq1 (index 0, host -> guest) and transmitq1 (index 1).
Offered features: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC (the MAC in config space) and
VIRTIO_NET_F_STATUS (link up); no offloads, no mergeable rx buffers, no control queue.
With VERSION_1 every buffer starts with the 12-byte ``struct virtio_net_hdr`` including
``num_buffers`` (§5.1.6: "virtio_net_hdr_v1").

* tx (:meth:`VirtioNet.process_queue` on queue 1, on the VMM's I/O thread): each chain
  is header + frame in device-readable buffers; the frame (header stripped) goes to the
  backend's ``send`` as views of guest memory, not copied. A chain with a device-writable buffer, a structural error, fewer
  than 12 bytes or more than MAX_BUFFER bytes is dropped and counted (``stats``).
* rx (:meth:`VirtioNet.on_readable`, called by the I/O thread when the backend's fd is
  readable, and :meth:`process_queue` on queue 0 when the driver adds buffers): each
  frame fills one chain of device-writable buffers, header first. A frame that does not
  fit the chain is dropped (the chain comes back with length 0), counted. While the
  driver has posted no buffers, frames wait in a backlog of RX_BACKLOG frames; beyond it
  they are dropped and counted (``rx_no_buffer``), as are frames arriving before the
  driver set DRIVER_OK.

The device model holds no fd and issues no syscall but through its backend
(vmm/net/base.py). Rings are only touched from ``process_queue`` (the transport's
request lock held): ``on_readable`` only appends to the backlog (``_lock``, held for
that alone) and then calls ``request_rx``, which the machine sets to the transport's
``notify(RX_QUEUE)``, so a broken rx ring gets DEVICE_NEEDS_RESET like any other, and
no lock of the transport is ever taken while ``_lock`` is held.

Snapshot state: ``mac`` and ``features`` (:meth:`save`); restore checks the features and
takes the MAC (the guest's driver read it). Frames in flight are not saved (a network
may lose frames).
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from typing import Callable, Sequence

from vmm.devices.state import U64_MAX, DeviceStateError, blob, fields, uint
from vmm.log import get_logger, log_once
from vmm.memory import GuestMemory
from vmm.net.base import MAX_FRAME, NetBackend

from .mmio import VIRTIO_F_VERSION_1
from .queue import DescriptorChain, Queue

log = get_logger(__name__)

#: Virtio device ID of a network card (§5.1.1).
VIRTIO_ID_NET = 1

# --- Feature bits (§5.1.3) -------------------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

#: Config status bit (§5.1.4): the link is up.
VIRTIO_NET_S_LINK_UP = 1

#: virtio_net_hdr gso_type (§5.1.6): no segmentation offload.
VIRTIO_NET_HDR_GSO_NONE = 0

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256

#: struct virtio_net_hdr with num_buffers (§5.1.6): u8 flags, u8 gso_type, le16
#: hdr_len, le16 gso_size, le16 csum_start, le16 csum_offset, le16 num_buffers.
_HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = _HDR.size  # 12
#: The rx header: nothing offloaded, the frame in one buffer (num_buffers = 1, §5.1.6.4).
RX_HEADER = _HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, 1)

#: Largest buffer (header + frame) the device reads or writes: 65535 bytes of IP
#: packet + 14 Ethernet + 1 (as in the Linux driver's limits) + the 12-byte header.
MAX_BUFFER = HDR_SIZE + MAX_FRAME  # 65562
#: Frames waiting for rx buffers at most (then dropped, counted).
RX_BACKLOG = 256

#: Fields of struct virtio_net_config (§5.1.4): name -> (offset, width).
CONFIG_FIELDS = {
    "mac": (0, 6),
    "status": (6, 2),
    "max_virtqueue_pairs": (8, 2),
}
CONFIG_SIZE = 10

#: The counters of ``VirtioNet.stats``.
STAT_KEYS = ("tx_frames", "tx_bytes", "tx_malformed", "tx_oversized", "tx_errors",
             "rx_frames", "rx_bytes", "rx_too_big", "rx_malformed", "rx_no_buffer")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; ValueError otherwise."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class VirtioNet:
    """A virtio network card in front of a :class:`vmm.net.base.NetBackend`.

    Args:
        backend: where frames go and come from; the device owns (closes) it.
        mac: the card's 6-byte MAC address (unicast).
    """

    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: NetBackend, mac: bytes):
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError("a NIC needs a 6-byte unicast MAC address")
        self.backend = backend
        self.mac = bytes(mac)
        self.features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
                         | (1 << VIRTIO_NET_F_STATUS))
        self.link_up = True
        #: Counters (STAT_KEYS): what was moved, and what was dropped and why.
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._logged: set = set()
        self._backend_gone = False
        #: Called (no lock held) when frames wait for the guest: the machine sets it to
        #: the transport's ``notify(RX_QUEUE)``.
        self.request_rx: Callable[[], None] | None = None
        self.reset()

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "VirtioNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_once(self, key, msg: str, *args) -> None:
        log_once(log, self._logged, key, "virtio-net %s: " + msg, format_mac(self.mac), *args)

    # -- snapshot state (see the module docstring) ---------------------------------------
    def save(self) -> dict:
        return {"v": 1, "mac": self.mac, "features": self.features}

    def restore(self, state: dict) -> None:
        """Check the offered features match, take the saved MAC.

        Raises:
            DeviceStateError: a bad value or other features; nothing is changed.
        """
        what = "virtio-net"
        fields(state, what, ("mac", "features"))
        features = uint(state, "features", what, U64_MAX)
        mac = blob(state, "mac", what, 6, exact=True)
        if features != self.features:
            raise DeviceStateError(f"virtio-net: the snapshot's NIC offered features "
                                   f"{features:#x}, this one offers {self.features:#x}")
        if mac[0] & 1:
            raise DeviceStateError("virtio-net state: mac is a multicast address")
        self.mac = mac

    # -- VirtioDevice ----------------------------------------------------------------------
    def _config(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return self.mac + status.to_bytes(2, "little") + (1).to_bytes(2, "little")

    def read_config(self, offset: int, size: int) -> int:
        """A config read (§5.1.4). The MAC is read byte by byte or in any naturally
        aligned piece inside it (Linux's virtio_cread_bytes reads bytes); status and
        max_virtqueue_pairs with their own width (§4.2.2.2). Anything else reads 0."""
        cfg = self._config()
        for name, (off, width) in CONFIG_FIELDS.items():
            if off <= offset and offset + size <= off + width and \
                    (name == "mac" or (size == width and offset == off)):
                return int.from_bytes(cfg[offset:offset + size], "little")
        self._log_once(("cfg-read",), "invalid config read of %d bytes at %#x", size, offset)
        return 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        # §5.1.4: the MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR... legacy; the
        # 1.x driver MUST NOT write config fields: nothing is writable here.
        self._log_once(("cfg-write",), "config write at %#x ignored", offset)

    def activate(self, queues: Sequence[Queue], mem: GuestMemory,
                 signal_used: Callable[[int], None]) -> None:
        self._queues = list(queues)
        self._mem = mem
        self._signal_used = signal_used

    def reset(self) -> None:
        """§2.4 / §5.1.6: forget the queues; frames waiting for rx buffers are dropped."""
        self._queues: list[Queue] = []
        self._mem: GuestMemory | None = None
        self._signal_used: Callable[[int], None] | None = None
        with self._lock:
            self.stats["rx_no_buffer"] += len(self._backlog)
            self._backlog.clear()

    def process_queue(self, index: int) -> None:
        """The driver notified queue ``index``: transmit (1), or use the new rx buffers
        for frames that were waiting (0).

        Raises:
            QueueError: the ring is broken (the transport sets DEVICE_NEEDS_RESET).
        """
        if index >= len(self._queues) or self._mem is None:
            return
        if index == TX_QUEUE:
            self._transmit()
        elif index == RX_QUEUE:
            self._deliver_backlog()

    # -- tx (§5.1.6.2) ---------------------------------------------------------------------
    def _transmit(self) -> None:
        q = self._queues[TX_QUEUE]
        done = 0
        try:
            while (chain := q.pop()) is not None:
                pieces = self._tx_frame(chain)
                if pieces is not None:
                    try:
                        self.backend.send(pieces)  # before add_used: the views are valid
                    except OSError as e:
                        self.stats["tx_errors"] += 1
                        self._log_once(("tx", e.errno), "backend send failed: %s",
                                       e.strerror)
                    else:
                        self.stats["tx_frames"] += 1
                        self.stats["tx_bytes"] += sum(map(len, pieces))
                    finally:
                        for v in pieces:
                            v.release()
                # §5.1.6.2.1: the device writes nothing into a tx chain (used len 0).
                q.add_used(chain.head_index, 0)
                done += 1
        finally:
            if done and self._signal_used:
                self._signal_used(TX_QUEUE)

    def _tx_frame(self, chain: DescriptorChain) -> list | None:
        """The frame of one tx chain as views of guest memory (header stripped, valid
        until the chain is returned), or None (dropped, counted)."""
        if chain.error:
            self.stats["tx_malformed"] += 1
            self._log_once(("tx-chain",), "malformed tx chain: %s", chain.error)
            return None
        total = 0
        for d in chain.descriptors:
            if d.write_only:  # §5.1.6.2: a tx chain is device-readable only
                self.stats["tx_malformed"] += 1
                self._log_once(("tx-write",), "tx chain with a device-writable buffer")
                return None
            total += d.len
        if total > MAX_BUFFER:
            self.stats["tx_oversized"] += 1
            self._log_once(("tx-big",), "tx buffer of %d bytes (more than %d) dropped",
                           total, MAX_BUFFER)
            return None
        if total < HDR_SIZE:  # §5.1.6: every buffer starts with the header
            self.stats["tx_malformed"] += 1
            self._log_once(("tx-short",), "tx buffer of %d bytes has no header", total)
            return None
        # The header's fields ask for offloads (checksum, GSO) that were not negotiated:
        # §5.1.6.2.1 the driver sets none of them, so they are not looked at. What
        # follows it is the frame, in as many pieces as the driver made.
        view = self._mem.host_view
        pieces = []
        skip = HDR_SIZE
        for d in chain.descriptors:
            n = d.len
            if skip >= n:
                skip -= n
                continue
            pieces.append(view[d.host + skip:d.host + n])
            skip = 0
        return pieces

    # -- rx (§5.1.6.3, §5.1.6.4) -------------------------------------------------------------
    def on_readable(self) -> None:
        """The backend's fd is readable (I/O thread): take its frames to the guest."""
        if self._backend_gone:
            return
        try:
            frames = self.backend.receive()
        except (EOFError, OSError) as e:
            self._backend_gone = True
            log.warning("virtio-net %s: network backend gone: %s", format_mac(self.mac), e)
            return
        if not frames:
            return
        if self._mem is None:
            # Not activated (no DRIVER_OK yet, or reset): nobody to give them to, and a
            # reset would drop them anyway (a benign race with activation: one batch).
            self.stats["rx_no_buffer"] += len(frames)
            return
        with self._lock:
            backlog = self._backlog
            for frame in frames:
                if len(backlog) >= RX_BACKLOG:
                    self.stats["rx_no_buffer"] += 1
                    continue
                backlog.append(frame)
        if self.request_rx is not None:
            self.request_rx()

    @property
    def backend_gone(self) -> bool:
        """The backend reported EOF (e.g. passt ended): nothing more will arrive."""
        return self._backend_gone

    def _deliver_backlog(self) -> None:
        """Put waiting frames into rx buffers while there are both (transport's
        request lock held: called from process_queue)."""
        q = self._queues[RX_QUEUE]
        if not q.ready:
            return
        backlog, lock = self._backlog, self._lock
        done = 0
        try:
            while backlog:
                chain = q.pop()  # QueueError: the transport sets DEVICE_NEEDS_RESET
                if chain is None:
                    break
                with lock:
                    frame = backlog.popleft()
                q.add_used(chain.head_index, self._rx_fill(chain, frame))
                done += 1
        finally:
            if done and self._signal_used:
                self._signal_used(RX_QUEUE)

    def _rx_fill(self, chain: DescriptorChain, frame: bytes) -> int:
        """Write header + ``frame`` into ``chain``; returns the used length (0: dropped)."""
        if chain.error:
            self.stats["rx_malformed"] += 1
            self._log_once(("rx-chain",), "malformed rx chain: %s", chain.error)
            return 0
        room = 0
        for d in chain.descriptors:
            if not d.write_only:  # §5.1.6.3: rx buffers are device-writable
                self.stats["rx_malformed"] += 1
                self._log_once(("rx-read",), "rx chain with a device-readable buffer")
                return 0
            room += d.len
        need = HDR_SIZE + len(frame)
        if need > room:
            self.stats["rx_too_big"] += 1
            self._log_once(("rx-big",), "%d-byte frame does not fit a %d-byte rx buffer",
                           len(frame), room)
            return 0
        view = self._mem.host_view
        descs = chain.descriptors
        d = descs[0]
        if d.len >= need:  # the usual case: one buffer takes header and frame
            view[d.host:d.host + HDR_SIZE] = RX_HEADER
            view[d.host + HDR_SIZE:d.host + need] = frame
        else:
            data = RX_HEADER + frame
            pos = 0
            for d in descs:
                if pos >= need:
                    break
                k = min(d.len, need - pos)
                view[d.host:d.host + k] = data[pos:pos + k]
                pos += k
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += len(frame)
        return need
