"""An 8250/16550A UART as a pure register machine (COM1 at port 0x3f8, IRQ 4).

Modelled on rust-vmm vm-superio ``src/serial.rs``: the device knows its eight
register offsets and nothing about KVM. It is handed two callables:

* ``interrupt()`` -- an *edge*: called each time an interrupt condition becomes
  newly pending. The VMM pulses the IRQ line (1 then 0) for each call.
* ``output(data)`` -- called with one byte for each THR write (DLAB clear,
  not in loopback).

Host input goes in through :meth:`Serial8250.enqueue_input` into a receive FIFO of
``fifo_size`` bytes. The FIFO is bounded: a host paste or flood cannot grow it;
bytes that do not fit are dropped and, as on a real 16550, the overrun error bit
(LSR OE) is set. An input thread that wants no loss checks
:meth:`Serial8250.input_space` first.

Transmission is instant: the THR is always empty (LSR THRE|TEMT, so an idle LSR
reads 0x60). A THR-empty interrupt therefore becomes pending as soon as IER THRI
is enabled (rising edge, as QEMU and Bochs do) and again after each THR write
while it is enabled; reading IIR while it reports THRI clears it (16550 datasheet,
"Interrupt Control Functions"). Linux's 8250 driver relies on this interrupt for
userspace tty writes (docs/emulation-only-hosts.md).

Interrupt priorities (IIR bits 3..1): receiver line status (OE, 0x06) > received
data available (0x04) > THR empty (0x02). Modem-status interrupts are not
generated: the modem lines never change except by the guest's own MCR writes in
loopback mode. IIR bits 7..6 read 0b11 while the FIFOs are enabled (FCR bit 0).
The UART is byte-wide: accesses wider than one byte read all-ones and are dropped.

Fast-path contract (for the native KVM_RUN loop)
------------------------------------------------
While the guest uses the UART in plain polled mode, the C shim handles THR writes
and LSR reads itself, without calling Python. :meth:`Serial8250.fast_path_state`
returns ``(tx_fast_ok, lsr_value)``:

* ``tx_fast_ok`` is True iff DLAB == 0, IER THRI == 0 and MCR LOOP == 0; then a
  THR write has no effect besides ``output(bytes([b]))``, so the shim may emit the
  byte itself.
* ``lsr_value`` is what an LSR read returns right now if that read has no side
  effects, else -1 (a pending overrun error, which the read clears). The shim may
  answer LSR reads with it while it is not -1.

The device calls ``on_state_change()`` (no arguments) after any register access or
input change that changed ``fast_path_state()``. The callback must re-query
``fast_path_state()`` -- the device passes nothing. Notifications are serialized by
the device (an internal re-entrant lock), so a callback that queries and then
publishes cannot publish a stale state after a fresher one. The callback may be
invoked from any thread that touched the device (a vCPU thread or the input thread).

Snapshot state
--------------
:meth:`Serial8250.save` hands out what the UART keeps as plain data:

* ``divisor`` (DLM:DLL, 0..0xffff), ``ier`` (bits 0..3), ``lcr``, ``mcr`` (bits
  0..4), ``scr``;
* ``fifo_enabled`` (FCR bit 0), ``overrun`` (LSR OE not yet read), ``thri_pending``
  (a THR-empty interrupt not yet cleared by an IIR read; only with IER THRI set);
* ``rx``: the receive FIFO's bytes, oldest first (at most ``fifo_size``).

IIR, LSR and MSR are not in it: they are computed from those (habit 10).
:meth:`Serial8250.restore` puts a freshly built UART back into such a state (checking
it all first) and then calls ``on_state_change`` so the fast path's view is resynced.
It raises no interrupt: an edge the guest had not taken yet is in the interrupt
controller's state, which the VM restores.

Threading
---------
A vCPU thread calls :meth:`read`/:meth:`write` while an input thread calls
:meth:`enqueue_input`. ``_lock`` protects every register and the receive FIFO.
``interrupt()``, ``output()`` and ``on_state_change()`` are always called *after*
``_lock`` is released, so they may call back into the device (e.g. the state
callback calls ``fast_path_state()``) without deadlocking. ``on_state_change`` runs
under ``_notify_lock``; it must not wait on another thread that is itself calling
into this device.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from vmm.devices.state import U8_MAX, U16_MAX, DeviceStateError, blob, fields, flag, uint

__all__ = ["Serial8250"]

# --- Register offsets from the base port (8250 register map) ---------------------
#: Receiver buffer (read) / transmitter holding (write) when DLAB = 0.
DATA_OFFSET = 0
#: Interrupt enable register when DLAB = 0.
IER_OFFSET = 1
#: Interrupt identification (read) / FIFO control (write).
IIR_OFFSET = 2
FCR_OFFSET = 2
#: Line control register.
LCR_OFFSET = 3
#: Modem control register.
MCR_OFFSET = 4
#: Line status register.
LSR_OFFSET = 5
#: Modem status register.
MSR_OFFSET = 6
#: Scratch register.
SCR_OFFSET = 7
#: Divisor latch low / high byte, at offsets 0 and 1 when DLAB = 1.
DLL_OFFSET = 0
DLM_OFFSET = 1
#: Number of registers, i.e. the length of the bus range to claim.
REGISTER_COUNT = 8
#: Length of the bus window: one port per register.
WINDOW_SIZE = REGISTER_COUNT

# --- IER bits -------------------------------------------------------------------
IER_RDA_BIT = 0x01  # received data available
IER_THRI_BIT = 0x02  # transmitter holding register empty
IER_RLSI_BIT = 0x04  # receiver line status
IER_MSI_BIT = 0x08  # modem status (stored, never raised)
IER_MASK = 0x0F

# --- IIR values -----------------------------------------------------------------
IIR_NONE_BIT = 0x01  # bit 0 set: no interrupt pending
IIR_THRI_ID = 0x02
IIR_RDA_ID = 0x04
IIR_RLS_ID = 0x06
IIR_FIFO_ENABLED_BITS = 0xC0

# --- FCR bits -------------------------------------------------------------------
FCR_ENABLE_BIT = 0x01
FCR_CLEAR_RX_BIT = 0x02
FCR_CLEAR_TX_BIT = 0x04

# --- LCR bits -------------------------------------------------------------------
LCR_DLAB_BIT = 0x80

# --- MCR bits -------------------------------------------------------------------
MCR_DTR_BIT = 0x01
MCR_RTS_BIT = 0x02
MCR_OUT1_BIT = 0x04
MCR_OUT2_BIT = 0x08
MCR_LOOP_BIT = 0x10
MCR_MASK = 0x1F

# --- LSR bits -------------------------------------------------------------------
LSR_DR_BIT = 0x01  # data ready
LSR_OE_BIT = 0x02  # overrun error (cleared by reading LSR)
LSR_THRE_BIT = 0x20  # THR empty
LSR_TEMT_BIT = 0x40  # transmitter empty

# --- MSR bits -------------------------------------------------------------------
MSR_CTS_BIT = 0x10
MSR_DSR_BIT = 0x20
MSR_RI_BIT = 0x40
MSR_DCD_BIT = 0x80

# --- Reset values ---------------------------------------------------------------
#: 115200 / 12 = 9600 baud, the conventional power-on divisor.
DEFAULT_BAUD_DIVISOR = 12
#: No interrupts enabled at power-on.
DEFAULT_INTERRUPT_ENABLE = 0x00
#: No interrupt pending.
DEFAULT_INTERRUPT_IDENTIFICATION = IIR_NONE_BIT
#: 8 data bits, 1 stop bit, no parity (8N1).
DEFAULT_LINE_CONTROL = 0x03
#: OUT2 set: on a PC it gates the UART's interrupt onto the ISA bus.
DEFAULT_MODEM_CONTROL = MCR_OUT2_BIT
#: Transmission is instant, so THR and the shift register are always empty.
DEFAULT_LINE_STATUS = LSR_THRE_BIT | LSR_TEMT_BIT
#: A peer is always there: carrier detect, data set ready, clear to send.
#: Linux waits for carrier (DCD) on a tty opened without CLOCAL.
DEFAULT_MODEM_STATUS = MSR_DCD_BIT | MSR_DSR_BIT | MSR_CTS_BIT
#: Scratch register is zero at power-on.
DEFAULT_SCRATCH = 0x00
#: Receive FIFO size in bytes (a 16550A has 16; larger costs nothing here).
DEFAULT_FIFO_SIZE = 64

# Pending interrupt sources, as a bit mask (internal).
_SRC_RLS = 0x4
_SRC_RDA = 0x2
_SRC_THRI = 0x1

#: The keys of Serial8250.save()'s state (besides "v").
_STATE_KEYS = ("divisor", "ier", "lcr", "mcr", "scr", "fifo_enabled", "overrun",
               "thri_pending", "rx")


class Serial8250:
    """A 16550A UART.

    Args:
        interrupt: Called (without arguments) on each newly pending interrupt.
        output: Called with one byte per transmitted character.
        fifo_size: Receive FIFO capacity in bytes (>= 1).
    """

    def __init__(
        self,
        interrupt: Callable[[], None],
        output: Callable[[bytes], None],
        fifo_size: int = DEFAULT_FIFO_SIZE,
    ) -> None:
        if fifo_size < 1:
            raise ValueError(f"fifo_size must be >= 1, got {fifo_size}")
        self._interrupt = interrupt
        self._output = output
        self.fifo_size = fifo_size
        #: Called after a change of fast_path_state(); see the module docstring.
        self.on_state_change: Callable[[], None] | None = None
        # _lock protects every field below (registers, FIFO, pending THRI).
        self._lock = threading.Lock()
        self._notify_lock = threading.RLock()
        self._divisor = DEFAULT_BAUD_DIVISOR
        self._ier = DEFAULT_INTERRUPT_ENABLE
        self._lcr = DEFAULT_LINE_CONTROL
        self._mcr = DEFAULT_MODEM_CONTROL
        self._scr = DEFAULT_SCRATCH
        self._fifo_enabled = False
        self._overrun = False
        self._thri_pending = False
        self._rx: collections.deque[int] = collections.deque()

    # --- State derived under _lock ----------------------------------------------

    def _pending(self) -> int:
        src = 0
        ier = self._ier
        if self._overrun and ier & IER_RLSI_BIT:
            src |= _SRC_RLS
        if self._rx and ier & IER_RDA_BIT:
            src |= _SRC_RDA
        if self._thri_pending:
            src |= _SRC_THRI
        return src

    def _iir(self) -> int:
        src = self._pending()
        if src & _SRC_RLS:
            iid = IIR_RLS_ID
        elif src & _SRC_RDA:
            iid = IIR_RDA_ID
        elif src & _SRC_THRI:
            iid = IIR_THRI_ID
        else:
            iid = IIR_NONE_BIT
        return iid | (IIR_FIFO_ENABLED_BITS if self._fifo_enabled else 0)

    def _lsr(self) -> int:
        lsr = DEFAULT_LINE_STATUS
        if self._rx:
            lsr |= LSR_DR_BIT
        if self._overrun:
            lsr |= LSR_OE_BIT
        return lsr

    def _msr(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP_BIT:
            return DEFAULT_MODEM_STATUS
        # Loopback (16550 datasheet, MCR bit 4): DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
        msr = 0
        if mcr & MCR_DTR_BIT:
            msr |= MSR_DSR_BIT
        if mcr & MCR_RTS_BIT:
            msr |= MSR_CTS_BIT
        if mcr & MCR_OUT1_BIT:
            msr |= MSR_RI_BIT
        if mcr & MCR_OUT2_BIT:
            msr |= MSR_DCD_BIT
        return msr

    def _fast_state(self) -> tuple[bool, int]:
        tx_ok = not (
            self._lcr & LCR_DLAB_BIT or self._ier & IER_THRI_BIT or self._mcr & MCR_LOOP_BIT
        )
        return tx_ok, (-1 if self._overrun else self._lsr())

    def _push_rx(self, data: bytes | bytearray | memoryview) -> int:
        """Appends to the FIFO what fits; sets OE if anything was dropped."""
        n = min(len(data), self.fifo_size - len(self._rx))
        if n > 0:
            self._rx.extend(data[:n])
        if n < len(data):
            self._overrun = True
        return n

    # --- Callbacks, outside _lock -----------------------------------------------

    def _after(self, irq: bool, changed: bool) -> None:
        if irq:
            self._interrupt()
        if changed:
            cb = self.on_state_change
            if cb is not None:
                with self._notify_lock:
                    cb()

    # --- Bus interface ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Reads register ``offset`` (0..7); see the class docstring."""
        if size != 1 or not 0 <= offset < REGISTER_COUNT:
            return (1 << (8 * size)) - 1
        changed = False
        with self._lock:
            dlab = self._lcr & LCR_DLAB_BIT
            if offset == DATA_OFFSET:
                if dlab:
                    return self._divisor & 0xFF
                if not self._rx:
                    return 0
                before = self._fast_state()
                value = self._rx.popleft()
                changed = not self._rx and before != self._fast_state()
            elif offset == IER_OFFSET:
                return (self._divisor >> 8) if dlab else self._ier
            elif offset == IIR_OFFSET:
                value = self._iir()
                if value & 0x0F == IIR_THRI_ID:
                    # Reading IIR while it reports THRI clears that interrupt.
                    self._thri_pending = False
                return value
            elif offset == LCR_OFFSET:
                return self._lcr
            elif offset == MCR_OFFSET:
                return self._mcr
            elif offset == LSR_OFFSET:
                value = self._lsr()
                if self._overrun:
                    self._overrun = False  # OE clears on LSR read.
                    changed = True
            elif offset == MSR_OFFSET:
                return self._msr()
            else:
                return self._scr
        if changed:
            self._after(False, True)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Writes ``value`` (one byte) to register ``offset`` (0..7)."""
        if size != 1 or not 0 <= offset < REGISTER_COUNT:
            return
        value &= 0xFF
        out: bytes | None = None
        with self._lock:
            before_state = self._fast_state()
            before = self._pending()
            dlab = self._lcr & LCR_DLAB_BIT
            if offset == DATA_OFFSET:
                if dlab:
                    self._divisor = (self._divisor & 0xFF00) | value
                else:
                    if self._mcr & MCR_LOOP_BIT:
                        self._push_rx(bytes((value,)))
                    else:
                        out = bytes((value,))
                    if self._ier & IER_THRI_BIT:
                        # Writing THR clears the THRE interrupt; the byte leaves at
                        # once, so THRE is pending again at once -- a new edge.
                        before &= ~_SRC_THRI
                        self._thri_pending = True
            elif offset == IER_OFFSET:
                if dlab:
                    self._divisor = (self._divisor & 0x00FF) | (value << 8)
                else:
                    old = self._ier
                    self._ier = value & IER_MASK
                    if not self._ier & IER_THRI_BIT:
                        self._thri_pending = False
                    elif not old & IER_THRI_BIT:
                        # Rising edge of THRI with THR empty (always): pending.
                        self._thri_pending = True
            elif offset == FCR_OFFSET:
                enable = bool(value & FCR_ENABLE_BIT)
                # Changing FCR bit 0 resets both FIFOs (16550 datasheet, FCR).
                if value & FCR_CLEAR_RX_BIT or enable != self._fifo_enabled:
                    self._rx.clear()
                self._fifo_enabled = enable
            elif offset == LCR_OFFSET:
                self._lcr = value
            elif offset == MCR_OFFSET:
                self._mcr = value & MCR_MASK
            elif offset == LSR_OFFSET or offset == MSR_OFFSET:
                pass  # Read-only (writes are "for factory testing" only).
            else:
                self._scr = value
            irq = bool(self._pending() & ~before)
            changed = before_state != self._fast_state()
        if out is not None:
            self._output(out)
        if irq or changed:
            self._after(irq, changed)

    # --- Host side --------------------------------------------------------------

    def enqueue_input(self, data: bytes | bytearray | memoryview) -> int:
        """Delivers host input to the receiver.

        Args:
            data: Bytes typed or pasted on the host side.

        Returns:
            How many leading bytes of ``data`` were accepted. The rest was dropped
            (and LSR OE set); in loopback mode the receiver is disconnected from the
            outside and nothing is accepted.
        """
        if not data:
            return 0
        with self._lock:
            if self._mcr & MCR_LOOP_BIT:
                return 0
            before_state = self._fast_state()
            before = self._pending()
            n = self._push_rx(data)
            irq = bool(self._pending() & ~before)
            changed = before_state != self._fast_state()
        if irq or changed:
            self._after(irq, changed)
        return n

    def input_space(self) -> int:
        """Free receive-FIFO slots (0 in loopback mode: input is not accepted)."""
        with self._lock:
            if self._mcr & MCR_LOOP_BIT:
                return 0
            return self.fifo_size - len(self._rx)

    def fast_path_state(self) -> tuple[bool, int]:
        """Returns ``(tx_fast_ok, lsr_value)``; see the module docstring."""
        with self._lock:
            return self._fast_state()

    def interrupt_pending(self) -> bool:
        """Whether IIR currently reports an interrupt (for tests and debugging)."""
        with self._lock:
            return self._pending() != 0

    # --- Snapshot state (see the module docstring) ------------------------------

    def save(self) -> dict:
        """The UART's state as plain data (``"v"`` plus the keys in the module
        docstring)."""
        with self._lock:
            return {"v": 1, "divisor": self._divisor, "ier": self._ier, "lcr": self._lcr,
                    "mcr": self._mcr, "scr": self._scr, "fifo_enabled": self._fifo_enabled,
                    "overrun": self._overrun, "thri_pending": self._thri_pending,
                    "rx": bytes(self._rx)}

    def restore(self, state: dict) -> None:
        """Put this UART into ``state`` (from :meth:`save`), then call
        ``on_state_change``.

        Raises:
            DeviceStateError: a value of the wrong type or range, more FIFO bytes than
                ``fifo_size``, a pending THRI without IER THRI; nothing is changed.
        """
        what = "serial"
        fields(state, what, _STATE_KEYS)
        divisor = uint(state, "divisor", what, U16_MAX)
        ier = uint(state, "ier", what, IER_MASK)
        lcr = uint(state, "lcr", what, U8_MAX)
        mcr = uint(state, "mcr", what, MCR_MASK)
        scr = uint(state, "scr", what, U8_MAX)
        fifo_enabled = flag(state, "fifo_enabled", what)
        overrun = flag(state, "overrun", what)
        thri_pending = flag(state, "thri_pending", what)
        rx = blob(state, "rx", what, self.fifo_size)
        if thri_pending and not ier & IER_THRI_BIT:
            # write() clears a pending THRI whenever IER THRI is cleared.
            raise DeviceStateError(f"{what} state: a THR-empty interrupt is pending "
                                   "with IER THRI clear")
        with self._lock:
            self._divisor, self._ier, self._lcr, self._mcr, self._scr = (
                divisor, ier, lcr, mcr, scr)
            self._fifo_enabled = fifo_enabled
            self._overrun = overrun
            self._thri_pending = thri_pending
            self._rx = collections.deque(rx)
        self._after(False, True)
