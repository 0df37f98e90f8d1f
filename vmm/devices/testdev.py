"""An MMIO scratch device for the bare-metal test guests.

Claim ``layout.TEST_MMIO_SIZE`` bytes at ``layout.TEST_MMIO_START``. Register map
(all little-endian, any access size 1/2/4/8 at any offset):

========  =====  ==========================================================
offset    size   meaning
========  =====  ==========================================================
0x00      4      ID, read-only: 0x4D4D5650, the bytes "PVMM"
0x04      4      number of writes to the device so far, read-only
0x10      64     scratch area: reads return what was written
else             reads 0, writes ignored (but counted)
========  =====  ==========================================================

Reads are assembled byte by byte, so an access that straddles two regions sees
each byte from its own region. ``writes`` records ``(offset, size, value)`` for
the host-side tests; it keeps the first ``WRITE_LOG_LIMIT`` writes only, so a
guest that writes in a loop cannot grow the VMM's memory (the counter at 0x04
keeps counting, modulo 2**32).

Snapshot state (:meth:`TestDevice.save` / :meth:`TestDevice.restore`, see
vmm/devices/state.py): ``scratch`` (64 bytes), ``write_count`` and ``writes`` (the log,
as ``[offset, size, value]`` lists).
"""

from __future__ import annotations

from vmm.devices.state import U64_MAX, DeviceStateError, blob, fields, uint

__all__ = ["TestDevice"]

ID_OFFSET = 0x00
#: "PVMM" as little-endian bytes 'P', 'V', 'M', 'M'.
ID_VALUE = int.from_bytes(b"PVMM", "little")  # 0x4D4D5650
WRITE_COUNT_OFFSET = 0x04
SCRATCH_OFFSET = 0x10
SCRATCH_SIZE = 64
#: Most entries kept in ``TestDevice.writes``.
WRITE_LOG_LIMIT = 4096
#: Access sizes an MMIO exit can have (KVM: 1..8 bytes).
_ACCESS_SIZES = range(1, 9)


class TestDevice:
    """The test guests' MMIO device (see the module docstring)."""

    __test__ = False  # Not a pytest test class despite the name.

    def __init__(self) -> None:
        self.scratch = bytearray(SCRATCH_SIZE)
        self.write_count = 0
        self.writes: list[tuple[int, int, int]] = []

    def _registers(self) -> bytes:
        return ID_VALUE.to_bytes(4, "little") + (self.write_count & 0xFFFF_FFFF).to_bytes(4, "little")

    def read(self, offset: int, size: int) -> int:
        """Reads ``size`` bytes at ``offset``, little-endian."""
        if SCRATCH_OFFSET <= offset and offset + size <= SCRATCH_OFFSET + SCRATCH_SIZE:
            start = offset - SCRATCH_OFFSET
            return int.from_bytes(self.scratch[start:start + size], "little")
        regs = self._registers()
        out = bytearray(size)
        for i in range(size):
            o = offset + i
            if o < len(regs):
                out[i] = regs[o]
            elif SCRATCH_OFFSET <= o < SCRATCH_OFFSET + SCRATCH_SIZE:
                out[i] = self.scratch[o - SCRATCH_OFFSET]
        return int.from_bytes(out, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Counts and records the write; bytes landing in the scratch area stick."""
        self.write_count += 1
        if len(self.writes) < WRITE_LOG_LIMIT:
            self.writes.append((offset, size, value))
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for i, b in enumerate(data):
            o = offset + i
            if SCRATCH_OFFSET <= o < SCRATCH_OFFSET + SCRATCH_SIZE:
                self.scratch[o - SCRATCH_OFFSET] = b

    # --- Snapshot state (see the module docstring) ----------------------------------

    def save(self) -> dict:
        """The scratch area, the write counter and the write log as plain data."""
        return {"v": 1, "scratch": bytes(self.scratch), "write_count": self.write_count,
                "writes": [list(w) for w in self.writes]}

    def restore(self, state: dict) -> None:
        """Put this device into ``state`` (from :meth:`save`).

        Raises:
            DeviceStateError: a bad value; nothing is changed.
        """
        what = "test-device"
        fields(state, what, ("scratch", "write_count", "writes"))
        scratch = blob(state, "scratch", what, SCRATCH_SIZE, exact=True)
        count = uint(state, "write_count", what, U64_MAX)
        log = state["writes"]
        if not isinstance(log, list) or len(log) > min(count, WRITE_LOG_LIMIT):
            raise DeviceStateError(f"{what} state: writes is not a list of at most "
                                   f"write_count and {WRITE_LOG_LIMIT} entries")
        writes = []
        for entry in log:
            if (not isinstance(entry, list) or len(entry) != 3
                    or not all(type(x) is int for x in entry)
                    or not 0 <= entry[0] <= U64_MAX or entry[1] not in _ACCESS_SIZES
                    or not 0 <= entry[2] <= U64_MAX):
                raise DeviceStateError(f"{what} state: a writes entry is not "
                                       "[offset, size, value]")
            writes.append(tuple(entry))
        self.scratch = bytearray(scratch)
        self.write_count = count
        self.writes = writes
