"""A minimal i8042 (PS/2) keyboard controller: enough for Linux to probe it fast
and to reboot the machine through it.

Claim a 5-byte window at port 0x60: offset 0 is the data port 0x60, offset 4 the
status (read) / command (write) port 0x64. Offsets 1..3 (ports 0x61..0x63) read
0xff and ignore writes; port 0x61 itself is served by KVM's in-kernel PIT.

What it answers, following Firecracker's ``devices/legacy/i8042.rs`` and what
Linux's ``drivers/input/serio/i8042.c`` sends at probe time:

* The status register reads "output buffer empty" unless a response is queued;
  the input buffer is never full (commands take effect at once), so Linux's
  ``i8042_wait_write`` never spins.
* Controller commands answered like real hardware: read/write the command byte
  (0x20/0x60), self test 0xAA -> 0x55, keyboard interface test 0xAB -> 0x00,
  disable/enable keyboard 0xAD/0xAE and aux 0xA7/0xA8 (they flip the command
  byte's KBDDIS/AUXDIS bits), read/write output port 0xD0/0xD1, write keyboard
  output buffer 0xD2.
* There is no aux (mouse) port. A PS/2 controller would echo an AUX_LOOP (0xD3)
  byte as aux data; this one returns it as keyboard data, and the aux interface
  test 0xA9 answers 0x01 ("clock line stuck low"). Linux's ``i8042_check_aux``
  then gives up at once instead of timing out or waiting 250 ms for IRQ 12.
* Reset: command 0xFE -- or any 0xF0..0xFF pulse command with bit 0 clear, or
  writing an output port value with bit 0 (system reset, active low) clear --
  calls ``reset()``. Linux reboots with 0xFE (``reboot=k``, the x86 default).
* Bytes written to the data port that are not a command parameter go to "the
  keyboard", which acknowledges them (0xFA; reset 0xFF -> 0xFA 0xAA, identify
  0xF2 -> 0xFA 0xAB 0x83, echo 0xEE -> 0xEE). Those answers raise IRQ 1 through
  the optional ``interrupt`` callable when the command byte enables it, since
  Linux's atkbd waits for them by interrupt; controller-command answers are
  polled by Linux and raise nothing.

Snapshot state (:meth:`I8042.save` / :meth:`I8042.restore`, see vmm/devices/state.py):
``ctr`` (the command byte), ``outp`` (the output port), ``status`` (the status
register's stored bits: SYS and CMD; OBF is computed from the queue), ``pending_cmd``
(a command waiting for its parameter byte, or None) and ``out`` (the output queue's
bytes, at most ``OUTPUT_QUEUE_SIZE``).

Only vCPU threads touch this device; the guest serializes its own 0x60/0x64
sequences (Linux holds ``i8042_lock``), so there is no lock here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from vmm.devices.state import U8_MAX, DeviceStateError, blob, fields, uint

__all__ = ["I8042"]

# --- Port offsets within the 5-byte window at 0x60 ---------------------------------
DATA_OFFSET = 0  # port 0x60
STATUS_OFFSET = 4  # port 0x64 (read: status, write: command)
COMMAND_OFFSET = 4
#: Length of the bus window (0x60..0x64).
WINDOW_SIZE = 5

# --- Status register bits -----------------------------------------------------------
STATUS_OBF_BIT = 0x01  # output buffer full: data waiting at port 0x60
STATUS_IBF_BIT = 0x02  # input buffer full (never: commands complete at once)
STATUS_SYS_BIT = 0x04  # system flag: self test passed
STATUS_CMD_BIT = 0x08  # last write was to the command port
STATUS_UNLOCKED_BIT = 0x10  # keyboard not inhibited
STATUS_AUXDATA_BIT = 0x20  # data in the output buffer came from the aux port

# --- Command byte ("CTR") bits --------------------------------------------------------
CTR_KBDINT_BIT = 0x01  # raise IRQ 1 for keyboard data
CTR_AUXINT_BIT = 0x02
CTR_SYS_BIT = 0x04
CTR_KBDDIS_BIT = 0x10
CTR_AUXDIS_BIT = 0x20
CTR_XLATE_BIT = 0x40

# --- Controller commands (written to port 0x64) --------------------------------------
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_RESET_CPU = 0xFE

#: Answers. 0x55: self test passed; 0x00: interface OK; 0x01: clock line stuck low.
SELF_TEST_OK = 0x55
KBD_TEST_OK = 0x00
AUX_TEST_NO_PORT = 0x01
KBD_ACK = 0xFA

# --- Output port bits ------------------------------------------------------------------
OUTP_RESET_BIT = 0x01  # system reset line, active low
OUTP_A20_BIT = 0x02

# --- Reset values -------------------------------------------------------------------
#: What a PC BIOS leaves: keyboard IRQ on, system flag, aux disabled (there is no
#: aux port), scancode translation on.
DEFAULT_CTR = CTR_KBDINT_BIT | CTR_SYS_BIT | CTR_AUXDIS_BIT | CTR_XLATE_BIT
#: Reset line deasserted, A20 enabled.
DEFAULT_OUTP = OUTP_RESET_BIT | OUTP_A20_BIT
#: Past POST, keyboard not inhibited, nothing to read.
DEFAULT_STATUS = STATUS_SYS_BIT | STATUS_UNLOCKED_BIT
#: Bytes the output queue holds (Linux's I8042_BUFFER_SIZE is 16 too); bounded.
OUTPUT_QUEUE_SIZE = 16

# Commands that take one parameter byte through port 0x60.
_PARAM_COMMANDS = frozenset({CMD_WRITE_CTR, CMD_WRITE_OUTP, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND})
#: Status bits the device stores (the rest are constant or computed, see read()).
_STATUS_STORED = STATUS_SYS_BIT | STATUS_CMD_BIT
_STATE_KEYS = ("ctr", "outp", "status", "pending_cmd", "out")


class I8042:
    """The 8042 controller.

    Args:
        reset: Called when the guest pulses the CPU reset line.
        interrupt: Optional IRQ 1 edge, for answers from the keyboard.
    """

    def __init__(self, reset: Callable[[], None], interrupt: Callable[[], None] | None = None) -> None:
        self._reset = reset
        self._interrupt = interrupt
        self.ctr = DEFAULT_CTR
        self.outp = DEFAULT_OUTP
        self._status = DEFAULT_STATUS
        #: Command waiting for its parameter byte at port 0x60, or None.
        self._pending_cmd: int | None = None
        self._out: collections.deque[int] = collections.deque(maxlen=OUTPUT_QUEUE_SIZE)

    # --- Bus interface ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Reads the data (offset 0) or status (offset 4) port."""
        if size != 1:
            return (1 << (8 * size)) - 1
        if offset == STATUS_OFFSET:
            return self._status | (STATUS_OBF_BIT if self._out else 0)
        if offset == DATA_OFFSET:
            if not self._out:
                return 0
            value = self._out.popleft()
            if self._out and self._interrupt is not None and self.ctr & CTR_KBDINT_BIT:
                self._interrupt()  # More keyboard bytes waiting: another IRQ 1.
            return value
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        """Writes a command (offset 4) or data / parameter byte (offset 0)."""
        if size != 1:
            return
        value &= 0xFF
        if offset == COMMAND_OFFSET:
            self._status |= STATUS_CMD_BIT
            self._command(value)
        elif offset == DATA_OFFSET:
            self._status &= ~STATUS_CMD_BIT
            cmd, self._pending_cmd = self._pending_cmd, None
            if cmd is None:
                self._keyboard(value)
            else:
                self._parameter(cmd, value)

    # --- Command handling ---------------------------------------------------------

    def _respond(self, value: int) -> None:
        """Answers a controller command: replaces whatever was waiting."""
        self._out.clear()
        self._out.append(value)

    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if cmd in _PARAM_COMMANDS:
            self._pending_cmd = cmd
        elif cmd == CMD_READ_CTR:
            self._respond(self.ctr)
        elif cmd == CMD_READ_OUTP:
            self._respond(self.outp)
        elif cmd == CMD_SELF_TEST:
            self._status |= STATUS_SYS_BIT
            self._respond(SELF_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._respond(KBD_TEST_OK)
        elif cmd == CMD_AUX_TEST:
            self._respond(AUX_TEST_NO_PORT)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS_BIT
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS_BIT
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS_BIT
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS_BIT
        elif cmd & 0xF0 == 0xF0:
            # Pulse output port bits 0..3 low for 6 us where cmd's bit is 0;
            # bit 0 is the CPU reset line. 0xFE pulses only reset; 0xFF is a no-op.
            if not cmd & OUTP_RESET_BIT:
                self._reset()
        # Anything else is not implemented and answered with nothing.

    def _parameter(self, cmd: int, value: int) -> None:
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTP:
            self.outp = value
            if not value & OUTP_RESET_BIT:
                self._reset()
        elif cmd in (CMD_KBD_LOOP, CMD_AUX_LOOP):
            # No aux port: an AUX_LOOP byte comes back as keyboard data (see above).
            self._respond(value)
        # CMD_AUX_SEND: there is no aux device to send to; the byte is dropped.

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself; it acknowledges everything."""
        if value == 0xEE:  # echo
            answer: tuple[int, ...] = (0xEE,)
        elif value == 0xFF:  # reset: ack, then BAT passed
            answer = (KBD_ACK, 0xAA)
        elif value == 0xF2:  # identify: ack, then "MF2 keyboard"
            answer = (KBD_ACK, 0xAB, 0x83)
        else:
            answer = (KBD_ACK,)
        self._out.clear()
        self._out.extend(answer)
        if self._interrupt is not None and self.ctr & CTR_KBDINT_BIT:
            self._interrupt()

    # --- Snapshot state (see the module docstring) ----------------------------------

    def save(self) -> dict:
        """The controller's state as plain data."""
        return {"v": 1, "ctr": self.ctr, "outp": self.outp, "status": self._status,
                "pending_cmd": self._pending_cmd, "out": bytes(self._out)}

    def restore(self, state: dict) -> None:
        """Put this controller into ``state`` (from :meth:`save`).

        Raises:
            DeviceStateError: a bad value; nothing is changed.
        """
        what = "i8042"
        fields(state, what, _STATE_KEYS)
        ctr = uint(state, "ctr", what, U8_MAX)
        outp = uint(state, "outp", what, U8_MAX)
        status = uint(state, "status", what, U8_MAX)
        if status & ~(DEFAULT_STATUS | _STATUS_STORED):
            raise DeviceStateError(f"{what} state: status {status:#x} has bits the "
                                   "device computes or never sets")
        pending = state["pending_cmd"]
        if pending is not None and (type(pending) is not int or pending not in _PARAM_COMMANDS):
            raise DeviceStateError(f"{what} state: pending_cmd {pending!r} is not a "
                                   "command that takes a parameter")
        out = blob(state, "out", what, OUTPUT_QUEUE_SIZE)
        self.ctr, self.outp, self._status, self._pending_cmd = ctr, outp, status, pending
        self._out = collections.deque(out, maxlen=OUTPUT_QUEUE_SIZE)
