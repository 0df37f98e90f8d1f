"""A vCPU's and a VM's KVM state as plain data, for snapshots (Firecracker-style).

``save_vcpu``/``restore_vcpu`` and ``save_vm``/``restore_vm`` move the state KVM keeps
between the kernel and a dict of ints, lists and ``bytes`` (each ``bytes`` is one ctypes
structure of vmm.kvm.structs, ``bytes(struct)``); the format layer base64s the bytes.
Nothing here issues an ioctl: it calls the vmm.kvm wrappers.

vCPU state dict::

    {"mp_state": int, "regs": bytes, "sregs": bytes, "xsave": bytes, "xcrs": bytes,
     "debugregs": bytes, "lapic": bytes, "msrs": [[index, value], ...],
     "vcpu_events": bytes}

VM state dict::

    {"pit2": bytes, "clock": bytes, "irqchip": [pic_master, pic_slave, ioapic]}

Restore checks every field (its presence, each ``bytes``' exact structure size, the
MSR pairs) before it applies anything, so a damaged state leaves the vCPU or VM as it
was; the one-line CpuStateError says which field is wrong.

Host notes (docs/emulation-only-hosts.md, /work/shared/HOST-KVM.md):

- The TSC cannot be set on emulation-only hosts: KVM accepts writes to IA32_TSC and
  IA32_TSC_ADJUST and ignores them, so a restored guest's TSC reads the host's, ahead
  by the time the snapshot was paused. Restore does not treat that as an error (it never
  reads the MSRs back).
- The 4 KiB KVM_GET_XSAVE area suffices while KVM_CAP_XSAVE2 reports 4096 (no
  dynamically enabled state such as AMX tiles); ``check_host`` says when it does not.
"""

from __future__ import annotations

import ctypes as C

from vmm.kvm import KvmError
from vmm.kvm import ioctls as K
from vmm.kvm import structs as S

__all__ = ["CpuStateError", "snapshot_msr_indices", "save_vcpu", "restore_vcpu", "save_vm",
           "restore_vm", "check_host", "VCPU_STRUCTS", "VM_STRUCTS", "IRQCHIP_IDS"]

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

#: The vCPU's bytes fields and their structures, in Firecracker's restore order
#: (MP_STATE, then these, with LAPIC before the MSRs and VCPU_EVENTS last).
VCPU_STRUCTS = {
    "regs": S.kvm_regs, "sregs": S.kvm_sregs, "xsave": S.kvm_xsave, "xcrs": S.kvm_xcrs,
    "debugregs": S.kvm_debugregs, "lapic": S.kvm_lapic_state,
    "vcpu_events": S.kvm_vcpu_events,
}
VM_STRUCTS = {"pit2": S.kvm_pit_state2, "clock": S.kvm_clock_data}
#: The in-kernel interrupt controllers, in the order of state["irqchip"].
IRQCHIP_IDS = (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE, K.KVM_IRQCHIP_IOAPIC)


class CpuStateError(ValueError):
    """A saved vCPU or VM state is malformed (missing field, wrong size); one line."""


def check_host(kvm) -> None:
    """Raise CpuStateError when this host's XSAVE state does not fit struct kvm_xsave.

    KVM_CAP_XSAVE2 (when the kernel has it) is the size KVM_GET_XSAVE2 would need; above
    4096 the legacy KVM_GET_XSAVE used here would lose state.
    """
    size = kvm.check_extension(K.KVM_CAP_XSAVE2)
    if size > C.sizeof(S.kvm_xsave):
        raise CpuStateError(f"this host's XSAVE state is {size} bytes; pyvmm snapshots "
                            f"hold {C.sizeof(S.kvm_xsave)} (KVM_GET_XSAVE2 is not supported)")


def snapshot_msr_indices(kvm, vcpu) -> list[int]:
    """The MSRs to save: every one of Kvm.msr_index_list() that KVM_GET_MSRS reads.

    Firecracker saves the whole index list too. KVM's list can name MSRs the vCPU's
    CPUID or the host makes unreadable (e.g. TSX_CTRL on a host without TSX); one such
    MSR would fail every save, so when reading the whole list fails the MSRs are tried
    one by one and the unreadable ones left out. On this host all of the list (41 MSRs
    on kernel 6.18) is readable and the one-by-one pass never runs. Call it once per VM,
    after the vCPU's CPUID is set.
    """
    indices = kvm.msr_index_list()
    try:
        vcpu.get_msrs(indices)
        return indices
    except KvmError:
        pass
    readable = []
    for index in indices:
        try:
            vcpu.get_msrs([index])
        except KvmError:
            continue
        readable.append(index)
    return readable


# -- vCPU ------------------------------------------------------------------------------
def save_vcpu(vcpu, msr_indices) -> dict:
    """The state of a stopped ``vcpu`` (after Vcpu.complete_pending_io) as plain data.

    Args:
        vcpu: a vmm.kvm.Vcpu not in KVM_RUN.
        msr_indices: the MSRs to save (snapshot_msr_indices).
    Returns:
        the vCPU state dict (module docstring).
    Raises:
        KvmError: KVM refused a get (naming the MSR, for KVM_GET_MSRS).
    """
    msrs = vcpu.get_msrs(msr_indices)
    return {
        "mp_state": vcpu.get_mp_state(),
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
        "xsave": bytes(vcpu.get_xsave()),
        "xcrs": bytes(vcpu.get_xcrs()),
        "debugregs": bytes(vcpu.get_debugregs()),
        "lapic": bytes(vcpu.get_lapic()),
        "msrs": [[index, value] for index, value in msrs.items()],
        "vcpu_events": bytes(vcpu.get_vcpu_events()),
    }


def restore_vcpu(vcpu, state: dict) -> None:
    """Put a saved state into ``vcpu`` (a fresh one whose CPUID is already set).

    Order (Firecracker's ``restore_state``): MP_STATE, REGS, SREGS, XSAVE, XCRS,
    DEBUGREGS, LAPIC (after SREGS, which carries the APIC base), MSRS with IA32_TSC
    before IA32_TSC_DEADLINE (the deadline is kept relative to the TSC), VCPU_EVENTS
    last (pending exceptions/interrupts apply to the state set before them). The TSC
    write succeeds but is ignored on this host (module docstring).

    Raises:
        CpuStateError: a field is missing or malformed; nothing was applied.
        KvmError: KVM refused a set (naming the MSR, for KVM_SET_MSRS).
    """
    structs = {name: _struct(state, name, t, "vCPU") for name, t in VCPU_STRUCTS.items()}
    mp_state = _int(state, "mp_state", "vCPU", 32)
    msrs = _msrs(state)

    vcpu.set_mp_state(mp_state)
    vcpu.set_regs(structs["regs"])
    vcpu.set_sregs(structs["sregs"])
    vcpu.set_xsave(structs["xsave"])
    vcpu.set_xcrs(structs["xcrs"])
    vcpu.set_debugregs(structs["debugregs"])
    vcpu.set_lapic(structs["lapic"])
    vcpu.set_msrs(msrs)
    vcpu.set_vcpu_events(structs["vcpu_events"])


def _msrs(state: dict) -> dict[int, int]:
    """state["msrs"] as an ordered {index: value}, IA32_TSC first."""
    pairs = state.get("msrs")
    if not isinstance(pairs, list):
        raise CpuStateError("vCPU state: 'msrs' is missing or not a list of [index, value]")
    msrs: dict[int, int] = {}
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                or not 0 <= pair[0] < 1 << 32 or not 0 <= pair[1] < 1 << 64):
            raise CpuStateError(f"vCPU state: bad MSR entry {pair!r} (want [u32 index, u64 value])")
        if pair[0] in msrs:
            raise CpuStateError(f"vCPU state: MSR {pair[0]:#x} appears twice")
        msrs[pair[0]] = pair[1]
    if MSR_IA32_TSC in msrs:
        msrs = {MSR_IA32_TSC: msrs.pop(MSR_IA32_TSC), **msrs}
    return msrs


# -- VM --------------------------------------------------------------------------------
def save_vm(vm) -> dict:
    """The in-kernel PIT, kvmclock and interrupt controllers of ``vm``, all vCPUs stopped.

    Returns:
        the VM state dict (module docstring); "irqchip" in IRQCHIP_IDS order.
    """
    return {
        "pit2": bytes(vm.get_pit2()),
        "clock": bytes(vm.get_clock()),
        "irqchip": [bytes(vm.get_irqchip(chip)) for chip in IRQCHIP_IDS],
    }


def restore_vm(vm, state: dict) -> None:
    """Put a saved state into ``vm`` (one with its irqchip and PIT created).

    Order: PIT2, CLOCK, the PIC master, PIC slave and IOAPIC. KVM_SET_CLOCK gets
    flags = 0: kernels before 5.16 reject the flags KVM_GET_CLOCK reports (TSC_STABLE,
    HOST_TSC; 6.18 here takes them, and still refuses unknown bits), and
    KVM_CLOCK_REALTIME would advance kvmclock by the wall time since the save; without
    it the guest's kvmclock continues from the saved value (it is off anyway under
    ``nopv``, the safe profile on emulation-only hosts).

    Raises:
        CpuStateError: a field is missing, malformed or names the wrong chip; nothing
            was applied.
        KvmError: KVM refused a set.
    """
    pit2 = _struct(state, "pit2", S.kvm_pit_state2, "VM")
    clock = _struct(state, "clock", S.kvm_clock_data, "VM")
    chips = state.get("irqchip")
    if not isinstance(chips, (list, tuple)) or len(chips) != len(IRQCHIP_IDS):
        raise CpuStateError(f"VM state: 'irqchip' must be a list of {len(IRQCHIP_IDS)} "
                            "byte strings (PIC master, PIC slave, IOAPIC)")
    irqchips = []
    for i, (raw, chip_id) in enumerate(zip(chips, IRQCHIP_IDS)):
        chip = _from_bytes(raw, S.kvm_irqchip, f"VM state: 'irqchip'[{i}]")
        if chip.chip_id != chip_id:
            raise CpuStateError(f"VM state: 'irqchip'[{i}] is chip {chip.chip_id}, want {chip_id}")
        irqchips.append(chip)
    clock.flags = 0

    vm.set_pit2(pit2)
    vm.set_clock(clock)
    for chip in irqchips:
        vm.set_irqchip(chip)


# -- checks ----------------------------------------------------------------------------
def _struct(state: dict, name: str, struct_type, what: str):
    if name not in state:
        raise CpuStateError(f"{what} state: '{name}' is missing")
    return _from_bytes(state[name], struct_type, f"{what} state: '{name}'")


def _from_bytes(raw, struct_type, where: str):
    if not isinstance(raw, (bytes, bytearray)):
        raise CpuStateError(f"{where} is {type(raw).__name__}, want bytes")
    size = C.sizeof(struct_type)
    if len(raw) != size:
        raise CpuStateError(f"{where} is {len(raw)} bytes, want {size} "
                            f"(struct {struct_type.__name__})")
    return struct_type.from_buffer_copy(raw)


def _int(state: dict, name: str, what: str, bits: int) -> int:
    value = state.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise CpuStateError(f"{what} state: '{name}' is {value!r}, want a u{bits}")
    return value
