"""CMOS RAM and an MC146818-style real-time clock at ports 0x70/0x71.

Claim a 2-byte window at port 0x70: offset 0 is the index port (write-only on a
PC; bit 7 masks NMIs, which a VMM has no use for, so it is ignored), offset 1 the
data port for the selected register.

The clock registers are computed from the host clock (UTC) at each read, so the
RTC never needs a timer. Status registers answer like an idle, valid RTC so that
Linux's ``mach_get_cmos_time`` / ``mc146818_get_time`` read the time once instead
of spinning:

* A (0x0A): 0x26 -- 32.768 kHz time base, 1024 Hz rate; UIP (bit 7, "update in
  progress") is always clear, because the time is computed, never being updated.
* B (0x0B): 0x02 -- 24-hour mode, BCD. The guest may change DM (bit 2, binary)
  and 24/12 (bit 1); reads follow those bits (MC146818 datasheet, register B).
* C (0x0C): 0 -- no interrupt flags (this RTC raises no interrupts).
* D (0x0D): 0x80 -- VRT, "valid RAM and time".

Writes to the time registers are accepted and ignored: the guest cannot move the
host's clock. Every other index (alarms, 0x0E..0x7F including the century byte's
neighbours) is plain RAM that reads back what was written, zero at power-on.

Snapshot state (:meth:`Cmos.save` / :meth:`Cmos.restore`, see vmm/devices/state.py):
``index`` (the selected register, 0..127) and ``ram`` (the 128 bytes). The NMI mask
bit of the index port is not kept (see above), so it is not in the state. Nor is the
clock: it is the host's, read at each access, so a restored guest reads the host's
time now -- the RTC jumps over the time the VM was paused, as a PC's does across a
suspend to disk. (The clock registers' RAM bytes are kept but never read.)

Only vCPU threads touch this device, and the guest serializes index/data pairs
itself (Linux holds ``rtc_lock``), so there is no lock here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmm.devices.state import DeviceStateError, blob, fields, uint

__all__ = ["Cmos"]

# --- Port offsets within the 2-byte window at 0x70 ------------------------------
INDEX_OFFSET = 0  # port 0x70
DATA_OFFSET = 1  # port 0x71
WINDOW_SIZE = 2

#: Index bit 7 disables NMIs on a PC; ignored.
INDEX_NMI_MASK_BIT = 0x80
INDEX_MASK = 0x7F

#: Bytes of CMOS RAM (standard 128, the MC146818's 14 clock registers included).
CMOS_SIZE = 128

# --- Register indexes (MC146818 datasheet; 0x32 is the PC's century byte) -------
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32

_TIME_REGISTERS = frozenset(
    {RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH,
     RTC_YEAR, RTC_CENTURY}
)

# --- Status register bits -------------------------------------------------------
REG_A_UIP_BIT = 0x80  # update in progress (never set here)
REG_B_SET_BIT = 0x80
REG_B_DM_BINARY_BIT = 0x04  # data mode: 1 = binary, 0 = BCD
REG_B_24H_BIT = 0x02
REG_D_VRT_BIT = 0x80  # valid RAM and time
HOURS_PM_BIT = 0x80  # in 12-hour mode

# --- Reset values ---------------------------------------------------------------
#: Divider 010 (32.768 kHz time base), rate 0110 (1024 Hz): the PC BIOS setting.
DEFAULT_REG_A = 0x26
#: 24-hour mode, BCD, no interrupts enabled: what Linux expects from a PC BIOS.
DEFAULT_REG_B = REG_B_24H_BIT
#: No interrupt flags pending.
DEFAULT_REG_C = 0x00
#: The battery is fine: RAM and time are valid.
DEFAULT_REG_D = REG_D_VRT_BIT


_STATE_KEYS = ("index", "ram")


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    """CMOS RAM plus RTC.

    Args:
        clock: Returns seconds since the Unix epoch (UTC); injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[RTC_REG_A] = DEFAULT_REG_A
        self._ram[RTC_REG_B] = DEFAULT_REG_B

    # --- Bus interface ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Reads the data port (offset 1); the index port reads 0xff."""
        if size != 1 or offset != DATA_OFFSET:
            return (1 << (8 * size)) - 1
        index = self._index
        if index in _TIME_REGISTERS:
            return self._time_register(index)
        if index == RTC_REG_A:
            return self._ram[RTC_REG_A] & ~REG_A_UIP_BIT
        if index == RTC_REG_C:
            return DEFAULT_REG_C
        if index == RTC_REG_D:
            return DEFAULT_REG_D
        return self._ram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        """Selects a register (offset 0) or writes the selected one (offset 1)."""
        if size != 1:
            return
        value &= 0xFF
        if offset == INDEX_OFFSET:
            self._index = value & INDEX_MASK
        elif offset == DATA_OFFSET:
            index = self._index
            if index in _TIME_REGISTERS or index in (RTC_REG_C, RTC_REG_D):
                return  # The host clock is not ours to set; C and D are read-only.
            if index == RTC_REG_A:
                value &= ~REG_A_UIP_BIT  # UIP is read-only.
            self._ram[index] = value

    # --- Snapshot state (see the module docstring) ----------------------------------

    def save(self) -> dict:
        """The index register and the RAM as plain data (not the clock: the host's)."""
        return {"v": 1, "index": self._index, "ram": bytes(self._ram)}

    def restore(self, state: dict) -> None:
        """Put this CMOS into ``state`` (from :meth:`save`).

        Raises:
            DeviceStateError: a bad value; nothing is changed.
        """
        what = "cmos"
        fields(state, what, _STATE_KEYS)
        index = uint(state, "index", what, INDEX_MASK)
        ram = blob(state, "ram", what, CMOS_SIZE, exact=True)
        if ram[RTC_REG_A] & REG_A_UIP_BIT:
            raise DeviceStateError(f"{what} state: register A has UIP set (read-only, "
                                   "never set here)")
        self._index = index
        self._ram = bytearray(ram)

    # --- Clock --------------------------------------------------------------------

    def _time_register(self, index: int) -> int:
        now = time.gmtime(self._clock())  # (not datetime: it costs start-up time)
        reg_b = self._ram[RTC_REG_B]
        pm = 0
        if index == RTC_SECONDS:
            value = now.tm_sec
        elif index == RTC_MINUTES:
            value = now.tm_min
        elif index == RTC_HOURS:
            value = now.tm_hour
            if not reg_b & REG_B_24H_BIT:
                # 12-hour mode: 1..12, bit 7 set for PM (not BCD-encoded).
                pm = HOURS_PM_BIT if value >= 12 else 0
                value = value % 12 or 12
        elif index == RTC_DAY_OF_WEEK:
            value = (now.tm_wday + 1) % 7 + 1  # 1 = Sunday .. 7 = Saturday
        elif index == RTC_DAY_OF_MONTH:
            value = now.tm_mday
        elif index == RTC_MONTH:
            value = now.tm_mon
        elif index == RTC_YEAR:
            value = now.tm_year % 100
        else:  # RTC_CENTURY
            value = now.tm_year // 100
        if not reg_b & REG_B_DM_BINARY_BIT:
            value = _bcd(value)
        return value | pm
