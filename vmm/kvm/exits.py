"""``kvm_run`` exits decoded once into small typed values.

The decoding reads the shared kvm_run page (mmap of the vCPU fd) at the offsets of
<linux/kvm.h>'s exit union, which starts at ``structs.KVM_RUN_EXIT_UNION`` (32).
"""

from __future__ import annotations

import struct

from vmm.kvm import ioctls as K
from vmm.kvm.structs import KVM_RUN_EXIT_UNION as U

_EXIT_REASON = struct.Struct("<I")           # at offset 8
_IO = struct.Struct("<BBHIQ")                # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")              # phys_addr, data[8], len, is_write
_INTERNAL = struct.Struct("<IIQB15s")        # suberror, ndata, flags, insn_size, insn_bytes
_SYSTEM_EVENT = struct.Struct("<I")
_FAIL_ENTRY = struct.Struct("<QI")


class _Exit:
    """Base of the typed exits: small slotted value objects (plain classes rather than
    dataclasses: they are made on every exit, and dataclasses cost start-up time)."""

    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)


class IoOut(_Exit):
    """Port write: ``count`` items of ``size`` bytes, as the guest wrote them."""
    __slots__ = ("port", "size", "count", "data")

    def __init__(self, port: int, size: int, count: int, data: bytes):
        self.port, self.size, self.count, self.data = port, size, count, data


class IoIn(_Exit):
    """Port read; the answer (count * size bytes) goes at ``data_offset`` in kvm_run."""
    __slots__ = ("port", "size", "count", "data_offset")

    def __init__(self, port: int, size: int, count: int, data_offset: int):
        self.port, self.size, self.count, self.data_offset = port, size, count, data_offset


class MmioWrite(_Exit):
    __slots__ = ("addr", "size", "value")

    def __init__(self, addr: int, size: int, value: int):
        self.addr, self.size, self.value = addr, size, value


class MmioRead(_Exit):
    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size


class Hlt(_Exit):
    __slots__ = ()


class Shutdown(_Exit):
    """Triple fault (or another shutdown condition)."""
    __slots__ = ()


class SystemEvent(_Exit):
    """KVM_SYSTEM_EVENT_{SHUTDOWN,RESET,CRASH} in ``type``."""
    __slots__ = ("type",)

    def __init__(self, type: int):
        self.type = type


class InternalError(_Exit):
    """``insn``: instruction bytes for emulation failures, else b""."""
    __slots__ = ("suberror", "insn")

    def __init__(self, suberror: int, insn: bytes):
        self.suberror, self.insn = suberror, insn


class FailEntry(_Exit):
    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


class Interrupted(_Exit):
    """KVM_RUN returned because of a signal or immediate_exit (KVM_EXIT_INTR/EINTR)."""
    __slots__ = ()


class Unknown(_Exit):
    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


def decode(run, reason: int | None = None):
    """Decode the exit currently described by the kvm_run page ``run`` (a buffer)."""
    if reason is None:
        reason = _EXIT_REASON.unpack_from(run, 8)[0]
    if reason == K.KVM_EXIT_IO:
        direction, size, port, count, off = _IO.unpack_from(run, U)
        if direction == K.KVM_EXIT_IO_OUT:
            return IoOut(port, size, count, bytes(run[off:off + size * count]))
        return IoIn(port, size, count, off)
    if reason == K.KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(run, U)
        length = min(length, 8)
        if is_write:
            return MmioWrite(addr, length, int.from_bytes(data[:length], "little"))
        return MmioRead(addr, length)
    if reason == K.KVM_EXIT_HLT:
        return Hlt()
    if reason == K.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == K.KVM_EXIT_INTR:
        return Interrupted()
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(_SYSTEM_EVENT.unpack_from(run, U)[0])
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        sub, ndata, _flags, size, insn = _INTERNAL.unpack_from(run, U)
        insn = insn[:min(size, 15)] if sub == K.KVM_INTERNAL_ERROR_EMULATION and ndata >= 2 else b""
        return InternalError(sub, insn)
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(_FAIL_ENTRY.unpack_from(run, U)[0])
    return Unknown(reason)


def complete_mmio_read(run, value: int, size: int) -> None:
    """Put the answer to an MmioRead where KVM picks it up on the next KVM_RUN."""
    run[U + 8:U + 8 + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def complete_io_in(run, exit: IoIn, data: bytes) -> None:
    run[exit.data_offset:exit.data_offset + len(data)] = data
