"""Boot CPU state for a 64-bit entry: GDT, identity page tables, registers, MSRs, FPU, LAPIC.

The boot vCPU starts directly in long mode, the way the Linux 64-bit boot protocol
(Documentation/x86/boot.rst, "64-bit Boot Protocol") asks: paging on with an identity
map, a GDT with __BOOT_CS (0x10) a 64-bit code segment and __BOOT_DS (0x18) data,
interrupts off, RSI pointing at struct boot_params.
"""

from __future__ import annotations

import ctypes as C
import struct

from vmm.arch.x86_64 import layout
from vmm.kvm import structs as S
from vmm.memory import GuestMemory

# GDT selectors (boot.rst: __BOOT_CS = 0x10, __BOOT_DS = 0x18).
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

X86_CR0_PE, X86_CR0_MP, X86_CR0_ET, X86_CR0_NE = 1 << 0, 1 << 1, 1 << 4, 1 << 5
X86_CR0_WP, X86_CR0_PG = 1 << 16, 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

PDE_PRESENT, PDE_RW, PDE_PS = 1 << 0, 1 << 1, 1 << 7

MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WRBACK = 1 << 11, 6

# Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 10.5.1).
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A GDT descriptor from Linux-style (flags, base, limit) (arch/x86/include/asm/segment.h)."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0x0000FFFF))


#: index -> descriptor; indices 0 and 1 are null so that CS lands at 0x10.
BOOT_GDT = [
    0, 0,
    gdt_entry(0xA09B, 0, 0xFFFFF),   # 0x10: 64-bit code, present, DPL 0
    gdt_entry(0xC093, 0, 0xFFFFF),   # 0x18: data, read/write
    gdt_entry(0x808B, 0, 0xFFFFF),   # 0x20: TSS (busy 64-bit), only so TR is valid
]


def _segment(selector: int, descriptor: int) -> S.kvm_segment:
    """The kvm_segment matching a GDT descriptor."""
    seg = S.kvm_segment()
    seg.base = ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 32) & 0xFF000000)
    limit = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF0000)
    seg.g = (descriptor >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = selector
    seg.type = (descriptor >> 40) & 0xF
    seg.present = (descriptor >> 47) & 1
    seg.dpl = (descriptor >> 45) & 3
    seg.db = (descriptor >> 54) & 1
    seg.s = (descriptor >> 44) & 1
    seg.l = (descriptor >> 53) & 1
    seg.avl = (descriptor >> 52) & 1
    seg.unusable = 0 if seg.present else 1
    return seg


def write_boot_tables(mem: GuestMemory) -> None:
    """GDT, an empty IDT and page tables identity-mapping the first 4 GiB (2 MiB pages)."""
    mem.write(layout.BOOT_GDT_START, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    mem.write(layout.BOOT_IDT_START, bytes(8))
    mem.write_int(layout.PML4_START, 8, layout.PDPT_START | PDE_PRESENT | PDE_RW)
    for i in range(layout.PD_COUNT):
        pd = layout.PD_START + i * 0x1000
        mem.write_int(layout.PDPT_START + 8 * i, 8, pd | PDE_PRESENT | PDE_RW)
        mem.write(pd, struct.pack("<512Q", *(((i << 30) + (j << 21)) | PDE_PRESENT | PDE_RW | PDE_PS
                                              for j in range(512))))


def setup_long_mode(vcpu, entry: int, *, boot_params: int = 0) -> None:
    """Put ``vcpu`` in 64-bit mode at ``entry`` using the tables of write_boot_tables."""
    sregs = vcpu.get_sregs()
    code = _segment(BOOT_CS, BOOT_GDT[BOOT_CS >> 3])
    data = _segment(BOOT_DS, BOOT_GDT[BOOT_DS >> 3])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = _segment(BOOT_TSS, BOOT_GDT[BOOT_TSS >> 3])
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT_START, len(BOOT_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT_START, 7
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
    sregs.cr3 = layout.PML4_START
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = S.kvm_regs()
    regs.rflags = 0x2            # bit 1 is reserved-as-one; IF clear
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = boot_params       # boot.rst: RSI holds the address of struct boot_params
    vcpu.set_regs(regs)

    fpu = S.kvm_fpu()
    fpu.fcw = 0x37F              # x87 default control word (FNINIT)
    fpu.mxcsr = 0x1F80           # SSE default: all exceptions masked
    vcpu.set_fpu(fpu)


def setup_msrs(vcpu) -> None:
    """Boot MSRs: SYSCALL/SYSENTER cleared, fast strings on, MTRRs on with write-back."""
    vcpu.set_msrs({
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
    })


def setup_lapic(vcpu) -> None:
    """LINT0 as ExtINT (the 8259 reaches the CPU: virtual-wire mode), LINT1 as NMI."""
    lapic = vcpu.get_lapic()
    raw = bytearray(lapic.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(raw[reg:reg + 4], "little")
        value = (value & ~0x700 & ~(1 << 16)) | (mode << 8)   # delivery mode, unmasked
        raw[reg:reg + 4] = value.to_bytes(4, "little")
    C.memmove(lapic.regs, bytes(raw), len(raw))
    vcpu.set_lapic(lapic)
