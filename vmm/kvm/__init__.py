"""The KVM layer: one wrapper per file descriptor (system, VM, vCPU).

This package is the only code in pyvmm that issues ioctls. Structures are in
``structs``, request numbers (computed from the structures) in ``ioctls``, typed exit
decoding in ``exits``.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os

from vmm.kvm import ioctls as K
from vmm.kvm import structs as S
from vmm.errors import HostError

KVM_API_VERSION = 12
KVM_DEVICE = "/dev/kvm"

#: Capabilities pyvmm cannot run without, with what each is for.
REQUIRED_CAPS = {
    K.KVM_CAP_IRQCHIP: "in-kernel interrupt controller",
    K.KVM_CAP_PIT2: "in-kernel PIT",
    K.KVM_CAP_USER_MEMORY: "user memory regions",
    K.KVM_CAP_SET_TSS_ADDR: "TSS address",
    K.KVM_CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID",
    K.KVM_CAP_IMMEDIATE_EXIT: "immediate_exit (prompt vCPU stop)",
}
#: Capabilities used when present (fast paths); their absence is reported, not fatal.
OPTIONAL_CAPS = {
    K.KVM_CAP_IRQFD: "irqfd",
    K.KVM_CAP_IOEVENTFD: "ioeventfd",
    K.KVM_CAP_VCPU_EVENTS: "vCPU events (int3 completion on emulation-only hosts)",
}


class KvmError(HostError):
    """KVM is unavailable or refused an operation; the message is one user-facing line."""


_libc = C.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]


def _ioctl(fd: int, request: int, arg=0, what: str = "ioctl") -> int:
    """fcntl.ioctl, with a one-line KvmError; integer arguments are unsigned longs."""
    try:
        if not isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg, True)
        if arg <= 0x7FFFFFFF:
            return fcntl.ioctl(fd, request, arg)
        # fcntl.ioctl passes integers as a C int; KVM_SET_TSS_ADDR needs a full address.
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            raise OSError(C.get_errno(), os.strerror(C.get_errno()))
        return ret
    except OSError as e:
        raise KvmError(f"KVM {what} failed: {os.strerror(e.errno)}") from None


class Kvm:
    """/dev/kvm: API version, capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(f"{path} does not exist: this host has no KVM (enable virtualisation "
                           "in firmware, load kvm_intel/kvm_amd, or enable nested virtualisation)") from None
        except PermissionError:
            raise KvmError(f"permission denied opening {path}: add your user to the 'kvm' group "
                           "(sudo usermod -aG kvm $USER) and log in again") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        try:
            version = fcntl.ioctl(self.fd, K.KVM_GET_API_VERSION)
        except OSError as e:
            self.close()
            raise KvmError(f"{path} is not a KVM device: {e.strerror}") from None
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError(f"unsupported KVM API version {version} (need {KVM_API_VERSION})")
        for cap, what in REQUIRED_CAPS.items():
            if not self.check_extension(cap):
                self.close()
                raise KvmError(f"this host's KVM lacks a required capability: {what}")
        self.missing_optional = [w for c, w in OPTIONAL_CAPS.items() if not self.check_extension(c)]
        self.vcpu_mmap_size = fcntl.ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE)
        self._msr_indices: list[int] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_extension(self, cap: int) -> int:
        try:
            return fcntl.ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def max_vcpus(self) -> tuple[int, int]:
        """(recommended, maximum) vCPU counts (KVM_CAP_NR_VCPUS, KVM_CAP_MAX_VCPUS)."""
        rec = self.check_extension(K.KVM_CAP_NR_VCPUS) or 4
        return rec, self.check_extension(K.KVM_CAP_MAX_VCPUS) or rec

    def supported_cpuid(self) -> list[S.kvm_cpuid_entry2]:
        n = 64
        while True:
            buf = S.array_buffer(S.kvm_cpuid2, S.kvm_cpuid_entry2, n)
            buf.header.nent = n
            try:
                fcntl.ioctl(self.fd, K.KVM_GET_SUPPORTED_CPUID, buf, True)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {e.strerror}") from None
            return [S.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.header.nent)]

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST), asked once per Kvm.

        The first call, with room for none, fails with E2BIG and reports the count; the
        second fetches that many. Returns a new list each time (the cache is kept apart).
        """
        if self._msr_indices is None:
            probe = S.kvm_msr_list(0)
            try:
                fcntl.ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, probe, True)
            except OSError as e:
                if e.errno != errno.E2BIG:
                    raise KvmError(f"KVM_GET_MSR_INDEX_LIST failed: {e.strerror}") from None
            buf = S.array_buffer(S.kvm_msr_list, C.c_uint32, probe.nmsrs)
            buf.header.nmsrs = probe.nmsrs
            _ioctl(self.fd, K.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            self._msr_indices = [buf.entries[i] for i in range(buf.header.nmsrs)]
        return list(self._msr_indices)

    def create_vm(self) -> "Vm":
        fd = _ioctl(self.fd, K.KVM_CREATE_VM, 0, "VM creation")
        return Vm(self, fd)


class Vm:
    """A VM fd: memory slots, in-kernel irqchip and PIT, IRQ lines, eventfds, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._next_slot = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def set_user_memory_region(self, guest_addr: int, size: int, host_addr: int) -> int:
        region = S.kvm_userspace_memory_region(self._next_slot, 0, guest_addr, size, host_addr)
        _ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region, "memory registration")
        self._next_slot += 1
        return region.slot

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, K.KVM_CREATE_IRQCHIP, 0, "irqchip creation")

    def create_pit2(self) -> None:
        _ioctl(self.fd, K.KVM_CREATE_PIT2, S.kvm_pit_config(), "PIT creation")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, K.KVM_IRQ_LINE, S.kvm_irq_level(irq, level), "KVM_IRQ_LINE")

    def pulse_irq(self, irq: int) -> None:
        """An edge on an ISA IRQ line (1 then 0), for edge-triggered devices."""
        self.irq_line(irq, 1)
        self.irq_line(irq, 0)

    def register_irqfd(self, fd: int, gsi: int) -> None:
        _ioctl(self.fd, K.KVM_IRQFD, S.kvm_irqfd(fd=fd, gsi=gsi), "KVM_IRQFD")

    def register_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                           datamatch: int | None = None) -> None:
        flags = (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        ev = S.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, K.KVM_IOEVENTFD, ev, "KVM_IOEVENTFD")

    # -- state (snapshots) ----------------------------------------------------------
    def get_pit2(self) -> S.kvm_pit_state2:
        s = S.kvm_pit_state2()
        _ioctl(self.fd, K.KVM_GET_PIT2, s, "KVM_GET_PIT2")
        return s

    def set_pit2(self, state: S.kvm_pit_state2) -> None:
        _ioctl(self.fd, K.KVM_SET_PIT2, state, "KVM_SET_PIT2")

    def get_clock(self) -> S.kvm_clock_data:
        s = S.kvm_clock_data()
        _ioctl(self.fd, K.KVM_GET_CLOCK, s, "KVM_GET_CLOCK")
        return s

    def set_clock(self, clock: S.kvm_clock_data) -> None:
        """KVM_SET_CLOCK. Of ``flags`` the kernel acts on KVM_CLOCK_REALTIME only; since
        5.16 it tolerates TSC_STABLE and HOST_TSC (what KVM_GET_CLOCK reports), before
        that it rejects any flag (EINVAL), so callers clear what they do not mean."""
        _ioctl(self.fd, K.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    def get_irqchip(self, chip_id: int) -> S.kvm_irqchip:
        """One in-kernel interrupt controller's state: K.KVM_IRQCHIP_PIC_MASTER (0),
        K.KVM_IRQCHIP_PIC_SLAVE (1) or K.KVM_IRQCHIP_IOAPIC (2)."""
        s = S.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, K.KVM_GET_IRQCHIP, s, f"KVM_GET_IRQCHIP (chip {chip_id})")
        return s

    def set_irqchip(self, chip: S.kvm_irqchip) -> None:
        """Restore the controller named by ``chip.chip_id``."""
        _ioctl(self.fd, K.KVM_SET_IRQCHIP, chip, f"KVM_SET_IRQCHIP (chip {chip.chip_id})")

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _ioctl(self.fd, K.KVM_CREATE_VCPU, index, f"vCPU {index} creation")
        return Vcpu(self, fd, index)


class Vcpu:
    """A vCPU fd and its shared kvm_run page."""

    def __init__(self, vm: Vm, fd: int, index: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self.run_page = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1

    # -- running -------------------------------------------------------------------
    def run(self) -> int:
        """One KVM_RUN. Returns the exit reason, or KVM_EXIT_INTR if interrupted.

        EAGAIN (an application processor's first KVM_RUN after INIT/SIPI) is treated
        like EINTR: run again.
        """
        try:
            fcntl.ioctl(self.fd, K.KVM_RUN, 0)
        except InterruptedError:
            return K.KVM_EXIT_INTR
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return K.KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN failed on vCPU {self.index}: {e.strerror}") from None
        return int.from_bytes(self.run_page[8:12], "little")

    @property
    def immediate_exit(self) -> int:
        return self.run_page[1]

    @immediate_exit.setter
    def immediate_exit(self, value: int) -> None:
        self.run_page[1] = value

    # -- state ---------------------------------------------------------------------
    def _get(self, request, struct_type, what):
        s = struct_type()
        _ioctl(self.fd, request, s, what)
        return s

    def get_regs(self) -> S.kvm_regs:
        return self._get(K.KVM_GET_REGS, S.kvm_regs, "KVM_GET_REGS")

    def set_regs(self, regs: S.kvm_regs) -> None:
        _ioctl(self.fd, K.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> S.kvm_sregs:
        return self._get(K.KVM_GET_SREGS, S.kvm_sregs, "KVM_GET_SREGS")

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        _ioctl(self.fd, K.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> S.kvm_fpu:
        return self._get(K.KVM_GET_FPU, S.kvm_fpu, "KVM_GET_FPU")

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        _ioctl(self.fd, K.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self) -> S.kvm_lapic_state:
        return self._get(K.KVM_GET_LAPIC, S.kvm_lapic_state, "KVM_GET_LAPIC")

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        _ioctl(self.fd, K.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return self._get(K.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, ev: S.kvm_vcpu_events) -> None:
        _ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: K.KVM_MP_STATE_RUNNABLE, _HALTED, _INIT_RECEIVED, ..."""
        return self._get(K.KVM_GET_MP_STATE, S.kvm_mp_state, "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, K.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state), "KVM_SET_MP_STATE")

    def get_xsave(self) -> S.kvm_xsave:
        """The 4 KiB XSAVE area (KVM_CAP_XSAVE; see S.kvm_xsave for when it is enough)."""
        return self._get(K.KVM_GET_XSAVE, S.kvm_xsave, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: S.kvm_xsave) -> None:
        _ioctl(self.fd, K.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> S.kvm_xcrs:
        """The extended control registers (XCR0) (KVM_CAP_XCRS)."""
        return self._get(K.KVM_GET_XCRS, S.kvm_xcrs, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: S.kvm_xcrs) -> None:
        _ioctl(self.fd, K.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_debugregs(self) -> S.kvm_debugregs:
        return self._get(K.KVM_GET_DEBUGREGS, S.kvm_debugregs, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: S.kvm_debugregs) -> None:
        _ioctl(self.fd, K.KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS")

    @staticmethod
    def _msr_buffer(items) -> "C.Structure":
        items = list(items)
        buf = S.array_buffer(S.kvm_msrs, S.kvm_msr_entry, len(items))
        buf.header.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            buf.entries[i].index, buf.entries[i].data = index, value
        return buf

    def get_msrs(self, indices) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``: {index: value}, in the order asked.

        Raises:
            KvmError: KVM read fewer than asked (it stops at the first MSR it cannot
                read); the message names that MSR.
        """
        indices = list(indices)
        buf = self._msr_buffer((i, 0) for i in indices)
        n = _ioctl(self.fd, K.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        if n != len(indices):
            raise KvmError(f"KVM cannot read MSR {indices[n]:#x} on vCPU {self.index} "
                           f"(read {n} of {len(indices)})")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS, in ``msrs``' order.

        Raises:
            KvmError: KVM wrote fewer than asked (it stops at the first MSR it refuses);
                the message names that MSR.
        """
        n = _ioctl(self.fd, K.KVM_SET_MSRS, self._msr_buffer(msrs.items()), "KVM_SET_MSRS")
        if n != len(msrs):
            bad = list(msrs)[n]
            raise KvmError(f"KVM refused MSR {bad:#x} on vCPU {self.index} "
                           f"(wrote {n} of {len(msrs)})")

    def complete_pending_io(self) -> None:
        """One KVM_RUN with immediate_exit set: KVM finishes the instruction of the last
        port-I/O or MMIO exit (an IN's value into RAX, RIP past the OUT) and returns at
        once without running the guest (EINTR). Call it on a stopped vCPU before reading
        its state, so that a snapshot never holds a half-done I/O instruction."""
        self.immediate_exit = 1
        try:
            reason = self.run()
        finally:
            self.immediate_exit = 0
        if reason != K.KVM_EXIT_INTR:
            raise KvmError(f"vCPU {self.index} ran while completing its pending I/O "
                           f"(exit reason {reason})")

    def set_cpuid(self, entries: list[S.kvm_cpuid_entry2]) -> None:
        buf = S.array_buffer(S.kvm_cpuid2, S.kvm_cpuid_entry2, len(entries))
        buf.header.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, K.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def tsc_khz(self) -> int:
        try:
            return fcntl.ioctl(self.fd, K.KVM_GET_TSC_KHZ)
        except OSError:
            return 0
