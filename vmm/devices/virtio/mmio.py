"""virtio-mmio transport, version 2 (virtio 1.2 §4.2).

The transport owns what every virtio device has in common: the register window
(§4.2.2), the device status handshake (§2.1, §3.1.1), feature negotiation (§2.2),
virtqueue setup and the interrupt status. The device model (e.g. blk.py) only sees
its configuration space, its queues and a ``signal_used`` callable.

Locking
-------
Two threads touch a transport: the vCPU thread (``read``/``write``: register
accesses) and the VMM's I/O thread (``notify``: it waits on the QueueNotify
ioeventfd and runs the device's request processing, so disk I/O never runs on the
vCPU thread). Two locks, always taken in this order:

* ``_io_lock`` serialises request processing (``device.process_queue`` and the
  ``Queue`` objects' ring state) with the device lifecycle: activation (DRIVER_OK)
  and reset wait for in-flight requests to finish.
* ``_lock`` protects the register state: status, feature words and selectors,
  queue configuration fields, interrupt status, config generation. It is only held
  for short register updates, never across disk I/O, so a vCPU reading
  InterruptStatus is not blocked by a slow disk.

Queue configuration (size, addresses, ready) can only change before DRIVER_OK or by
reset, both of which exclude request processing; so the I/O thread may read it while
holding only ``_io_lock``. ``interrupt()`` is always called with no lock held.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence

from vmm.arch.x86_64 import layout
from vmm.log import get_logger, log_once
from vmm.memory import GuestMemory, GuestMemoryError

from .queue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Queue,
    QueueError,
)

log = get_logger(__name__)

# --- Register offsets (§4.2.2, table "MMIO Device Register Layout") ---------------------
MAGIC_VALUE_OFFSET = 0x000
VERSION_OFFSET = 0x004
DEVICE_ID_OFFSET = 0x008
VENDOR_ID_OFFSET = 0x00C
DEVICE_FEATURES_OFFSET = 0x010
DEVICE_FEATURES_SEL_OFFSET = 0x014
DRIVER_FEATURES_OFFSET = 0x020
DRIVER_FEATURES_SEL_OFFSET = 0x024
QUEUE_SEL_OFFSET = 0x030
QUEUE_NUM_MAX_OFFSET = 0x034
QUEUE_NUM_OFFSET = 0x038
QUEUE_READY_OFFSET = 0x044
QUEUE_NOTIFY_OFFSET = 0x050
INTERRUPT_STATUS_OFFSET = 0x060
INTERRUPT_ACK_OFFSET = 0x064
STATUS_OFFSET = 0x070
QUEUE_DESC_LOW_OFFSET = 0x080
QUEUE_DESC_HIGH_OFFSET = 0x084
QUEUE_DRIVER_LOW_OFFSET = 0x090
QUEUE_DRIVER_HIGH_OFFSET = 0x094
QUEUE_DEVICE_LOW_OFFSET = 0x0A0
QUEUE_DEVICE_HIGH_OFFSET = 0x0A4
SHM_SEL_OFFSET = 0x0AC
SHM_LEN_LOW_OFFSET = 0x0B0
SHM_LEN_HIGH_OFFSET = 0x0B4
SHM_BASE_LOW_OFFSET = 0x0B8
SHM_BASE_HIGH_OFFSET = 0x0BC
QUEUE_RESET_OFFSET = 0x0C0
CONFIG_GENERATION_OFFSET = 0x0FC
CONFIG_OFFSET = 0x100

#: "virt" in little-endian (§4.2.2 MagicValue).
MAGIC_VALUE = 0x74726976
#: Version 2 is the non-legacy interface (§4.2.2 Version).
MMIO_VERSION = 2
#: "PYVM" little-endian; drivers match on DeviceID, VendorID is informational.
VENDOR_ID = 0x4D565950

# --- Device status bits (§2.1) ---------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# --- InterruptStatus bits (§4.2.2) -------------------------------------------------------
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

# --- Reserved feature bits (§6) ----------------------------------------------------------
VIRTIO_F_VERSION_1 = 32

#: Ring features the Queue implements; offered on top of the device's own features.
TRANSPORT_FEATURES = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


class VirtioDevice(Protocol):
    """What a device model gives the transport.

    Attributes:
        device_id: the virtio device ID (§5: 2 = block).
        features: the feature bits the device offers, VIRTIO_F_VERSION_1 included.
        queue_max_sizes: QueueNumMax for each queue (powers of two).
    """

    device_id: int
    features: int
    queue_max_sizes: Sequence[int]

    def read_config(self, offset: int, size: int) -> int:
        """A config-space read at ``offset`` (from 0); 0 for an invalid access."""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """A config-space write (ignored where the layout has no writable field)."""

    def activate(self, queues: Sequence[Queue], mem: GuestMemory,
                 signal_used: Callable[[int], None]) -> None:
        """The driver set DRIVER_OK: start serving ``queues`` (only ``ready`` ones).

        ``signal_used(i)`` is to be called from within ``process_queue(i)`` after
        adding used buffers to queue ``i``.
        """

    def process_queue(self, index: int) -> None:
        """Serve everything available on queue ``index``; raise QueueError if broken."""

    def reset(self) -> None:
        """Forget the queues and any per-activation state (§2.4)."""


def kernel_cmdline_arg(base: int, irq: int, size: int = layout.VIRTIO_MMIO_SIZE) -> str:
    """The Linux command-line option that declares one virtio-mmio device.

    >>> kernel_cmdline_arg(0xd0000000, 5)
    'virtio_mmio.device=4K@0xd0000000:5'
    """
    return f"virtio_mmio.device={size // 1024}K@{base:#x}:{irq}"


class VirtioMmioTransport:
    """One virtio-mmio register window (a BusDevice) in front of a device model.

    Args:
        device: the device model.
        mem: guest RAM, where the driver puts the virtqueues.
        interrupt: called (no lock held) whenever the guest should be interrupted; an
            edge — the VMM pulses the IRQ line or writes an irqfd.
        queue_notify: optional; when the guest's QueueNotify write does reach
            :meth:`write` (no ioeventfd registered), it is handed to this callable (e.g.
            one that wakes the VMM's I/O thread) instead of being served inline.
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory, interrupt: Callable[[], None],
                 *, queue_notify: Callable[[int], None] | None = None):
        self.device = device
        self.mem = mem
        self._interrupt = interrupt
        self._queue_notify = queue_notify
        self._io_lock = threading.Lock()
        self._lock = threading.Lock()
        self.queues = [Queue(m) for m in device.queue_max_sizes]
        self._logged: set[tuple] = set()
        self._config_generation = 0
        self._clear_state()

    def _clear_state(self) -> None:
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._interrupt_status = 0
        for q in self.queues:
            q.reset()

    @property
    def offered_features(self) -> int:
        return self.device.features | TRANSPORT_FEATURES

    @property
    def status(self) -> int:
        with self._lock:
            return self._status

    @property
    def interrupt_status(self) -> int:
        with self._lock:
            return self._interrupt_status

    @property
    def driver_features(self) -> int:
        with self._lock:
            return self._driver_features

    def _log_once(self, key: tuple, msg: str, *args) -> None:
        """Warn once per ``key``; keys never hold guest-chosen values (bounded set)."""
        log_once(log, self._logged, key, "virtio-mmio(%s): " + msg, type(self.device).__name__,
                 *args)

    # -- BusDevice ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` in the window."""
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                self._log_once(("cfg-width", size), "config read of width %d", size)
                return 0
            return self.device.read_config(offset - CONFIG_OFFSET, size)
        if size != 4 or offset % 4:  # §4.2.2.2: registers are accessed 32 bits wide
            self._log_once(("width", offset, size), "%d-byte read of register %#x ignored",
                           size, offset)
            return 0
        with self._lock:
            return self._read_register(offset) & 0xFFFFFFFF

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == MAGIC_VALUE_OFFSET:
            return MAGIC_VALUE
        if offset == VERSION_OFFSET:
            return MMIO_VERSION
        if offset == DEVICE_ID_OFFSET:
            return self.device.device_id
        if offset == VENDOR_ID_OFFSET:
            return VENDOR_ID
        if offset == DEVICE_FEATURES_OFFSET:
            sel = self._device_features_sel
            return (self.offered_features >> (32 * sel)) if sel < 2 else 0
        if offset == QUEUE_NUM_MAX_OFFSET:
            return q.max_size if q else 0  # §4.2.2: 0 when the queue is not available
        if offset == QUEUE_READY_OFFSET:
            return int(q.ready) if q else 0
        if offset == INTERRUPT_STATUS_OFFSET:
            return self._interrupt_status
        if offset == STATUS_OFFSET:
            return self._status
        if offset == CONFIG_GENERATION_OFFSET:
            return self._config_generation
        if offset in (SHM_LEN_LOW_OFFSET, SHM_LEN_HIGH_OFFSET,
                      SHM_BASE_LOW_OFFSET, SHM_BASE_HIGH_OFFSET):
            return 0xFFFFFFFF  # §4.2.2: all ones = no such shared memory region
        if offset in (QUEUE_NUM_OFFSET, QUEUE_DESC_LOW_OFFSET, QUEUE_DESC_HIGH_OFFSET,
                      QUEUE_DRIVER_LOW_OFFSET, QUEUE_DRIVER_HIGH_OFFSET,
                      QUEUE_DEVICE_LOW_OFFSET, QUEUE_DEVICE_HIGH_OFFSET,
                      DEVICE_FEATURES_SEL_OFFSET, DRIVER_FEATURES_OFFSET,
                      DRIVER_FEATURES_SEL_OFFSET, QUEUE_SEL_OFFSET, QUEUE_NOTIFY_OFFSET,
                      INTERRUPT_ACK_OFFSET, SHM_SEL_OFFSET, QUEUE_RESET_OFFSET):
            return 0  # write-only registers
        self._log_once(("read", offset), "read of unknown register %#x", offset)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset`` in the window."""
        if offset >= CONFIG_OFFSET:
            if size not in (1, 2, 4, 8):
                self._log_once(("cfg-width", size), "config write of width %d", size)
                return
            with self._lock:
                self.device.write_config(offset - CONFIG_OFFSET, size, value)
            return
        if size != 4 or offset % 4:  # §4.2.2.2
            self._log_once(("width", offset, size), "%d-byte write of register %#x ignored",
                           size, offset)
            return
        value &= 0xFFFFFFFF
        if offset == QUEUE_NOTIFY_OFFSET:
            # No ioeventfd: the write reached us. Hand it to the I/O thread when the VMM
            # gave us a way to, else serve it here.
            (self._queue_notify or self.notify)(value)
            return
        if offset == STATUS_OFFSET:
            self._write_status(value)
            return
        with self._lock:
            fire = self._write_register(offset, value)
        if fire:
            self._interrupt()

    def _write_register(self, offset: int, value: int) -> bool:
        if offset == DEVICE_FEATURES_SEL_OFFSET:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL_OFFSET:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES_OFFSET:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL_OFFSET:
            self._queue_sel = value
        elif offset == INTERRUPT_ACK_OFFSET:
            self._interrupt_status &= ~value
        elif offset in (QUEUE_NUM_OFFSET, QUEUE_READY_OFFSET, QUEUE_DESC_LOW_OFFSET,
                        QUEUE_DESC_HIGH_OFFSET, QUEUE_DRIVER_LOW_OFFSET,
                        QUEUE_DRIVER_HIGH_OFFSET, QUEUE_DEVICE_LOW_OFFSET,
                        QUEUE_DEVICE_HIGH_OFFSET):
            self._write_queue_register(offset, value)
        elif offset in (SHM_SEL_OFFSET, QUEUE_RESET_OFFSET):
            pass  # no shared memory regions; VIRTIO_F_RING_RESET is not offered
        else:
            self._log_once(("write", offset), "write to read-only/unknown register %#x",
                           offset)
        return False

    def _write_driver_features(self, value: int) -> None:
        # §3.1.1 step 4: features are written after DRIVER and before FEATURES_OK.
        if not self._status & STATUS_DRIVER or self._status & STATUS_FEATURES_OK:
            self._log_once(("features-state",), "DriverFeatures written in status %#x",
                           self._status)
            return
        sel = self._driver_features_sel
        if sel >= 2:
            self._log_once(("features-sel",), "DriverFeaturesSel %d ignored", sel)
            return
        mask = 0xFFFFFFFF << (32 * sel)
        self._driver_features = (self._driver_features & ~mask) | (value << (32 * sel))

    def _selected_queue(self) -> Queue | None:
        sel = self._queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self._log_once(("qsel",), "queue %d does not exist",
                           self._queue_sel)
            return
        # §4.2.3.2: queues are configured before DRIVER_OK, while not ready.
        if self._status & STATUS_DRIVER_OK:
            self._log_once(("queue-after-ok", offset), "queue register %#x written after "
                           "DRIVER_OK", offset)
            return
        if offset == QUEUE_READY_OFFSET:
            if value & 1:
                why = q.check_layout(self.mem)
                if why:
                    self._log_once(("queue-bad",),
                                   "queue %d cannot be made ready: %s", self._queue_sel, why)
                    return
            q.ready = bool(value & 1)
            return
        if q.ready:
            self._log_once(("queue-ready", offset), "queue register %#x written while "
                           "the queue is ready", offset)
            return
        if offset == QUEUE_NUM_OFFSET:
            q.size = value  # validated when the driver sets QueueReady (§4.2.2)
            return
        attr = {QUEUE_DESC_LOW_OFFSET: "desc_table", QUEUE_DESC_HIGH_OFFSET: "desc_table",
                QUEUE_DRIVER_LOW_OFFSET: "avail_ring", QUEUE_DRIVER_HIGH_OFFSET: "avail_ring",
                QUEUE_DEVICE_LOW_OFFSET: "used_ring", QUEUE_DEVICE_HIGH_OFFSET: "used_ring"}
        name = attr[offset]
        old = getattr(q, name)
        if offset & 4:  # the *_HIGH half
            setattr(q, name, (old & 0xFFFFFFFF) | (value << 32))
        else:
            setattr(q, name, (old & ~0xFFFFFFFF) | value)

    # -- device status (§2.1, §3.1.1) -------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:  # §4.2.2 Status: writing zero triggers a device reset
            self.reset()
            return
        with self._io_lock, self._lock:
            old = self._status
            value &= ~STATUS_DEVICE_NEEDS_RESET  # device-owned bit (§2.1)
            if (old & ~STATUS_DEVICE_NEEDS_RESET) & ~value:
                # §2.1.1: the driver MUST NOT clear a device status bit.
                self._log_once(("status-clear",), "status write %#x clears bits of %#x",
                               value, old)
                return
            new = value & ~old
            if new & STATUS_FAILED:  # the driver gave up; accepted at any time
                self._status |= STATUS_FAILED
            steps = ((STATUS_ACKNOWLEDGE, 0),
                     (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
                     (STATUS_FEATURES_OK, STATUS_DRIVER),
                     (STATUS_DRIVER_OK, STATUS_FEATURES_OK))
            for bit, needs in steps:
                if not new & bit:
                    continue
                if needs and not self._status & needs:  # §3.1.1 order
                    self._log_once(("status-order", bit), "status bit %#x set before %#x",
                                   bit, needs)
                    return
                if bit == STATUS_FEATURES_OK and not self._features_acceptable():
                    return  # §2.2.1 / §3.1.1 step 6: FEATURES_OK stays clear
                if bit == STATUS_DRIVER_OK:
                    self._activate()
                self._status |= bit

    def _features_acceptable(self) -> bool:
        acked, offered = self._driver_features, self.offered_features
        if acked & ~offered:  # §2.2.1: the driver MUST NOT accept unoffered features
            self._log_once(("features-unoffered",), "driver accepted unoffered features "
                           "%#x", acked & ~offered)
            return False
        if not acked >> VIRTIO_F_VERSION_1 & 1:  # §6.1: no legacy interface here
            self._log_once(("features-legacy",), "driver did not accept VIRTIO_F_VERSION_1")
            return False
        return True

    def _activate(self) -> None:
        acked = self._driver_features
        for q in self.queues:
            if q.ready:
                q.activate(self.mem,
                           event_idx=bool(acked >> VIRTIO_RING_F_EVENT_IDX & 1),
                           indirect=bool(acked >> VIRTIO_RING_F_INDIRECT_DESC & 1))
        self.device.activate(self.queues, self.mem, self._signal_used)

    def reset(self) -> None:
        """Device reset (§2.4): status, features, queues and interrupt status cleared.

        Waits for a request being processed on the I/O thread to finish.
        """
        with self._io_lock, self._lock:
            self.device.reset()
            self._clear_state()

    # -- notifications -------------------------------------------------------------------
    def notify(self, index: int) -> None:
        """The driver notified queue ``index`` (QueueNotify); serve its requests.

        Called on the VMM's I/O thread (ioeventfd) or from :meth:`write`. Ignored before
        DRIVER_OK (§2.1.2: the device MUST NOT consume buffers before DRIVER_OK), after
        DEVICE_NEEDS_RESET or FAILED, and for queues that do not exist or are not ready.
        """
        with self._io_lock:
            with self._lock:
                status = self._status
                ok = (status & STATUS_DRIVER_OK
                      and not status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)
                      and 0 <= index < len(self.queues) and self.queues[index].ready)
            if not ok:
                self._log_once(("notify",), "notify of queue %d ignored in "
                               "status %#x", index, status)
                return
            try:
                self.device.process_queue(index)
            except (QueueError, GuestMemoryError) as e:
                self.set_needs_reset(f"queue {index}: {e}")

    def _signal_used(self, index: int) -> None:
        """Handed to the device: used buffers were added to queue ``index``."""
        if not self.queues[index].needs_notification():  # under _io_lock (process_queue)
            return
        with self._lock:
            self._interrupt_status |= INT_USED_BUFFER
        self._interrupt()

    def set_needs_reset(self, why: str) -> None:
        """The driver broke the device: set DEVICE_NEEDS_RESET (§2.1.2) and tell it."""
        log.warning("virtio-mmio(%s): device needs reset: %s", type(self.device).__name__, why)
        with self._lock:
            self._status |= STATUS_DEVICE_NEEDS_RESET
            # §2.1.2: if DRIVER_OK is set, send a configuration change notification.
            fire = bool(self._status & STATUS_DRIVER_OK)
            if fire:
                self._interrupt_status |= INT_CONFIG_CHANGE
        if fire:
            self._interrupt()

    def config_changed(self) -> None:
        """The device changed its configuration space (e.g. a resized disk) (§4.2.2)."""
        with self._lock:
            self._config_generation = (self._config_generation + 1) & 0xFFFFFFFF
            fire = bool(self._status & STATUS_DRIVER_OK)
            if fire:
                self._interrupt_status |= INT_CONFIG_CHANGE
        if fire:
            self._interrupt()
