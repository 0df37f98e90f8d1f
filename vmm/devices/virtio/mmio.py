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

Snapshot state
--------------
:meth:`VirtioMmioTransport.save` hands out the transport's register state as plain data
(vmm/devices/state.py): ``status``, ``device_features_sel``, ``driver_features_sel``,
``driver_features``, ``queue_sel``, ``interrupt_status``, ``config_generation``,
``queues`` (one Queue state each, vmm/devices/virtio/queue.py) and ``device``: the
device model's own ``save()``, or None for a model without one. It takes ``_io_lock``,
so no request is half-served in it.

:meth:`VirtioMmioTransport.restore`, on a transport freshly built over a freshly built
device (same arguments), checks all of it first -- the status bits in §3.1.1 order,
acked features the device offers once FEATURES_OK is set (§2.2.1), each ready queue's
size and rings as QueueReady would (§2.7, §4.2.3.2) -- then restores the device model
(which checks its own part), then the registers and queues. With DRIVER_OK set the
ready queues come back activated with their saved ring indexes (activation would zero
them) and the device is activated on them, as DRIVER_OK did. Nothing is raised to the
guest: a pending interrupt is in the interrupt controller's state, which the VM
restores, and ``interrupt_status`` is the saved one.

A request the driver made available before the pause but the device had not served
yet (its QueueNotify was lost with the old process, or not yet handled) is served by
:meth:`VirtioMmioTransport.kick_all`, which the machine calls once after restoring,
before or as the vCPUs resume: it serves every ready queue as a notification would.
An extra kick is harmless (an empty queue is left alone).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence

from vmm.arch.x86_64 import layout
from vmm.devices.state import (U8_MAX, U32_MAX, U64_MAX, DeviceStateError, fields,
                               uint)
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

#: Status bits a transport can hold (§2.1).
_STATUS_BITS = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK
                | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)
#: (bit, the bit it needs first): the §3.1.1 initialisation order _write_status enforces.
_STATUS_STEPS = ((STATUS_DRIVER, STATUS_ACKNOWLEDGE), (STATUS_FEATURES_OK, STATUS_DRIVER),
                 (STATUS_DRIVER_OK, STATUS_FEATURES_OK))
#: The keys of VirtioMmioTransport.save()'s state (besides "v").
_STATE_KEYS = ("status", "device_features_sel", "driver_features_sel", "driver_features",
               "queue_sel", "interrupt_status", "config_generation", "queues", "device")


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

    def _features_problem(self, acked: int) -> tuple[str, str] | None:
        """(a log key, why) when the driver may not accept ``acked``; None when it may."""
        offered = self.offered_features
        if acked & ~offered:  # §2.2.1: the driver MUST NOT accept unoffered features
            return "features-unoffered", f"driver accepted unoffered features " \
                                         f"{acked & ~offered:#x}"
        if not acked >> VIRTIO_F_VERSION_1 & 1:  # §6.1: no legacy interface here
            return "features-legacy", "driver did not accept VIRTIO_F_VERSION_1"
        return None

    def _features_acceptable(self) -> bool:
        problem = self._features_problem(self._driver_features)
        if problem:
            self._log_once((problem[0],), "%s", problem[1])
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

    def change_device(self, change: Callable[[], None]) -> None:
        """Run ``change`` -- the device model changing what it serves and its
        configuration space (a disk inserted into an empty drive) -- with no request
        being served, then send the configuration change notification."""
        with self._io_lock:
            change()
        self.config_changed()

    def config_changed(self) -> None:
        """The device changed its configuration space (e.g. a resized disk) (§4.2.2)."""
        with self._lock:
            self._config_generation = (self._config_generation + 1) & 0xFFFFFFFF
            fire = bool(self._status & STATUS_DRIVER_OK)
            if fire:
                self._interrupt_status |= INT_CONFIG_CHANGE
        if fire:
            self._interrupt()

    # -- snapshot state (see the module docstring) ---------------------------------------
    def save(self) -> dict:
        """The transport's state, its queues' and its device model's, as plain data.

        Waits for a request being served on the I/O thread to finish.
        """
        save_device = getattr(self.device, "save", None)
        with self._io_lock, self._lock:
            return {"v": 1, "status": self._status,
                    "device_features_sel": self._device_features_sel,
                    "driver_features_sel": self._driver_features_sel,
                    "driver_features": self._driver_features,
                    "queue_sel": self._queue_sel,
                    "interrupt_status": self._interrupt_status,
                    "config_generation": self._config_generation,
                    "queues": [q.save() for q in self.queues],
                    "device": save_device() if save_device is not None else None}

    def restore(self, state: dict) -> None:
        """Put this transport and its device model into ``state`` (from :meth:`save`);
        see the module docstring. Then call :meth:`kick_all` once the VM can run.

        Raises:
            DeviceStateError: a bad value (type, range, an order of status bits the
                driver cannot reach, unoffered features, a ready queue that QueueReady
                would refuse, absurd ring indexes), or the device model's own refusal;
                nothing is changed.
        """
        what = f"virtio-mmio({type(self.device).__name__})"
        fields(state, what, _STATE_KEYS)
        status = uint(state, "status", what, U8_MAX)
        if status & ~_STATUS_BITS:
            raise DeviceStateError(f"{what} state: status {status:#x} has unknown bits")
        for bit, needs in _STATUS_STEPS:
            if status & bit and not status & needs:  # §3.1.1 order
                raise DeviceStateError(f"{what} state: status {status:#x} has bit "
                                       f"{bit:#x} without {needs:#x}")
        regs = {k: uint(state, k, what, U32_MAX) for k in (
            "device_features_sel", "driver_features_sel", "queue_sel", "config_generation")}
        acked = uint(state, "driver_features", what, U64_MAX)
        interrupt_status = uint(state, "interrupt_status", what,
                                INT_USED_BUFFER | INT_CONFIG_CHANGE)
        if status & STATUS_FEATURES_OK:
            problem = self._features_problem(acked)
            if problem:  # §2.2.1: FEATURES_OK is set only over acceptable features
                raise DeviceStateError(f"{what} state: {problem[1]}")
        queues = state["queues"]
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise DeviceStateError(f"{what} state: queues is not a list of "
                                   f"{len(self.queues)} queue states")
        driver_ok = bool(status & STATUS_DRIVER_OK)
        plan = []
        for i, (q, qs) in enumerate(zip(self.queues, queues)):
            activated = driver_ok and isinstance(qs, dict) and qs.get("ready") is True
            q.check_state(qs, self.mem, activated=activated, what=f"{what} queue {i}")
            plan.append((q, qs, activated))
        restore_device = getattr(self.device, "restore", None)
        dev_state = state["device"]
        if (dev_state is None) != (restore_device is None):
            raise DeviceStateError(f"{what} state: device state is "
                                   f"{'missing' if dev_state is None else 'unexpected'}")
        if restore_device is not None:
            restore_device(dev_state)  # checks its state first, raises untouched
        event_idx = bool(acked >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(acked >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        with self._io_lock, self._lock:
            if self._status & STATUS_DRIVER_OK:
                self.device.reset()  # not a fresh transport: drop the old activation
            self._clear_state()
            self._status = status
            self._device_features_sel = regs["device_features_sel"]
            self._driver_features_sel = regs["driver_features_sel"]
            self._queue_sel = regs["queue_sel"]
            self._config_generation = regs["config_generation"]
            self._driver_features = acked
            self._interrupt_status = interrupt_status
            for i, (q, qs, activated) in enumerate(plan):
                q.restore(qs, self.mem, activated=activated, event_idx=event_idx,
                          indirect=indirect, what=f"{what} queue {i}")
            if driver_ok:
                self.device.activate(self.queues, self.mem, self._signal_used)

    def kick_all(self) -> None:
        """Serve every ready queue once, as a QueueNotify of each would (:meth:`notify`).

        The machine calls it after :meth:`restore`: requests the driver had made
        available before the snapshot but that were not served yet complete now. Does
        nothing before DRIVER_OK or after DEVICE_NEEDS_RESET / FAILED. Runs the device's
        request processing (disk I/O) on the calling thread, under ``_io_lock``.
        """
        with self._lock:
            status = self._status
        if not status & STATUS_DRIVER_OK or status & (STATUS_DEVICE_NEEDS_RESET
                                                      | STATUS_FAILED):
            return
        for i, q in enumerate(self.queues):
            if q.ready:
                self.notify(i)
