"""The CPUID table each vCPU gets: KVM_GET_SUPPORTED_CPUID, normalised per vCPU.

Normalisation (what Firecracker and QEMU do too): the APIC ID of each vCPU in leaves 1,
0xB and 0x1F; a flat topology of ``cpu_count`` single-thread cores in one package
(leaves 1, 4, 0xB, 0x1F); the hypervisor bit; no PMU (leaf 0xA zeroed). The KVM
paravirt leaves (0x40000000...) are passed on as KVM reports them.

Note: on emulation-only hosts CPUID executed by the guest returns the *host's* values
whatever this table says (see docs/emulation-only-hosts.md); the table still matters there because
KVM's own emulation (the LAPIC's TSC-deadline timer, for one) follows it.
"""

from __future__ import annotations

from vmm.kvm import structs as S

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_EDX_HTT = 1 << 28
LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2 = 0xB, 0x1F
LEVEL_TYPE_SMT, LEVEL_TYPE_CORE = 1, 2


def _copy(e: S.kvm_cpuid_entry2) -> S.kvm_cpuid_entry2:
    return S.kvm_cpuid_entry2.from_buffer_copy(e)


def _bits_for(n: int) -> int:
    """Bits needed to hold n-1 (APIC ID field width for n logical units)."""
    return max(0, (n - 1).bit_length())


def vcpu_cpuid(supported: list[S.kvm_cpuid_entry2], index: int, cpu_count: int) -> list[S.kvm_cpuid_entry2]:
    """The CPUID entries for vCPU ``index`` of ``cpu_count``."""
    out = []
    core_shift = _bits_for(cpu_count)
    for src in supported:
        e = _copy(src)
        f = e.function
        if f == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | ((cpu_count & 0xFF) << 16)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            if cpu_count > 1:
                e.edx |= CPUID_1_EDX_HTT
            else:
                e.edx &= ~CPUID_1_EDX_HTT
        elif f == 4:
            # Deterministic cache parameters: cores per package - 1 in EAX[31:26],
            # logical CPUs sharing this cache - 1 in EAX[25:14] (one thread per core).
            e.eax = (e.eax & 0x3FFF) | ((cpu_count - 1) << 26)
        elif f == 0xA:
            e.eax = e.ebx = e.ecx = e.edx = 0      # no PMU
        elif f in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            if e.index == 0:                    # SMT level: one thread per core
                e.eax, e.ebx, e.ecx = 0, 1, (LEVEL_TYPE_SMT << 8)
            elif e.index == 1:                  # core level: cpu_count cores
                e.eax, e.ebx, e.ecx = core_shift, cpu_count, (LEVEL_TYPE_CORE << 8) | 1
            else:
                e.eax = e.ebx = 0
                e.ecx = e.index
            e.edx = index                       # x2APIC ID
        out.append(e)
    return out
