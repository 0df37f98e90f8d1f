"""The Intel MultiProcessor Specification 1.4 tables that tell a guest about its vCPUs.

Linux (arch/x86/kernel/mpparse.c) finds the MP floating pointer structure by scanning
the first KiB of the EBDA, follows it to the MP configuration table, and reads one
processor entry per CPU from there; without the table it assumes one CPU.

What is written at layout.EBDA_START (MP spec 1.4, chapter 4; entries in the order
section 4.3 asks for, by entry type):

- the floating pointer (4.1), immediately followed by the configuration table header
  (4.2), then
- one processor entry per vCPU (4.3.1): local APIC ID = vCPU index, which is the APIC
  ID KVM gives each vCPU; vCPU 0 is the bootstrap processor;
- one bus entry, "ISA   " (4.3.2);
- one I/O APIC entry (4.3.3): ID ``cpu_count`` (the first ID after the processors),
  version 0x11 (what KVM's in-kernel I/O APIC reports), at layout.IOAPIC_START;
- sixteen I/O interrupt assignment entries (4.3.4): ISA IRQ n -> I/O APIC pin n for
  n = 0..15. This is the identity routing KVM installs by default
  (kvm_setup_default_irq_routing: GSI n drives 8259 input n and I/O APIC pin n), so
  the PIT's IRQ 0 arrives on pin 0 -- not on pin 2 as on PC firmware with an
  interrupt source override (docs/emulation-only-hosts.md: IRQ 0 must map to pin 0). Firecracker
  (arch/x86_64/mptable.rs) and kvmtool (x86/mptable.c) write the same identity
  routing.
- two local interrupt entries (4.3.5): LINT0 ExtINT and LINT1 NMI, both to every
  local APIC (0xFF), as in the spec's default configurations (chapter 5).

No ExtINT entry for an I/O APIC pin: pin 0 is the PIT's (above), and a second entry on
the same pin would contradict the mp_INT one. The 8259 reaches the BSP through LINT0
(virtual-wire mode, cpu.setup_lapic), which Linux's check_timer() falls back to if
IRQ 0 through the I/O APIC does not tick; Firecracker and kvmtool omit it as well.
The floating pointer's IMCRP bit is clear: the system starts in virtual-wire mode
(4.1, feature byte 2), so Linux does not touch the IMCR ports 0x22/0x23.
"""

from __future__ import annotations

import struct

from vmm.arch.x86_64 import layout
from vmm.memory import GuestMemory

# --- Floating pointer structure (MP spec 1.4, section 4.1) ---------------------------
MPF_SIGNATURE = b"_MP_"
#: "<4s I B B B B B 3s": signature, physical address pointer, length in 16-byte
#: paragraphs, spec revision, checksum, feature bytes 1 and 2, feature bytes 3-5.
MPF_FORMAT = "<4sIBBBBB3s"
MPF_SIZE = struct.calcsize(MPF_FORMAT)
#: Spec revision 1.4 (4.1: "SPEC_REV ... 04h for version 1.4").
MP_SPEC_REV_1_4 = 4
#: Feature byte 1 (4.1): 0 = a configuration table is present (no default configuration).
MPF_FEATURE1_CONFIG_TABLE = 0
#: Feature byte 2, bit 7 IMCRP (4.1): clear = virtual-wire mode, no IMCR.
MPF_FEATURE2_VIRTUAL_WIRE = 0

# --- Configuration table header (section 4.2) -------------------------------------------
MPC_SIGNATURE = b"PCMP"
#: signature, base table length, spec revision, checksum, OEM ID, product ID,
#: OEM table pointer, OEM table size, entry count, local APIC address,
#: extended table length, extended table checksum, reserved.
MPC_FORMAT = "<4sHBB8s12sIHHIHBB"
MPC_SIZE = struct.calcsize(MPC_FORMAT)
MPC_OEM_ID = b"PYVMM   "          # 4.2: 8 bytes, space padded
MPC_PRODUCT_ID = b"PYVMM SMP   "  # 4.2: 12 bytes, space padded

# --- Entry types (section 4.3, table 4-3) -------------------------------------------------
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4

# --- Processor entry (section 4.3.1) --------------------------------------------------------
#: type, local APIC ID, local APIC version, CPU flags, CPU signature, feature flags, reserved.
MPC_CPU_FORMAT = "<BBBBII8x"
MPC_CPU_SIZE = struct.calcsize(MPC_CPU_FORMAT)
#: CPU flags (4.3.1): EN (usable) and BP (the bootstrap processor).
CPU_FLAG_ENABLED, CPU_FLAG_BSP = 1 << 0, 1 << 1
#: Local APIC version: what KVM's in-kernel local APIC reports (APIC_VERSION 0x14,
#: an integrated xAPIC).
LAPIC_VERSION = 0x14
#: CPU signature (4.3.1: stepping [3:0], model [7:4], family [11:8]): family 6, as
#: Firecracker writes. Linux only prints it.
CPU_SIGNATURE = 0x600
#: Feature flags (4.3.1, CPUID.1:EDX): FPU (bit 0) and an on-chip APIC (bit 9).
CPU_FEATURE_FPU, CPU_FEATURE_APIC = 1 << 0, 1 << 9

# --- Bus entry (section 4.3.2) ---------------------------------------------------------------
#: type, bus ID, bus type string (6 bytes, space padded; table 4-8).
MPC_BUS_FORMAT = "<BB6s"
MPC_BUS_SIZE = struct.calcsize(MPC_BUS_FORMAT)
BUS_ID_ISA = 0
BUS_TYPE_ISA = b"ISA   "

# --- I/O APIC entry (section 4.3.3) ------------------------------------------------------------
#: type, I/O APIC ID, I/O APIC version, flags, address.
MPC_IOAPIC_FORMAT = "<BBBBI"
MPC_IOAPIC_SIZE = struct.calcsize(MPC_IOAPIC_FORMAT)
#: KVM's in-kernel I/O APIC version register (IOAPIC_VERSION_ID, 82093AA-compatible).
IOAPIC_VERSION = 0x11
#: I/O APIC flags (4.3.3): EN.
IOAPIC_FLAG_ENABLED = 1 << 0

# --- I/O and local interrupt entries (sections 4.3.4 and 4.3.5) --------------------------------
#: type, interrupt type, flags, source bus ID, source bus IRQ, destination APIC ID,
#: destination INTIN# (I/O APIC pin) or LINTIN# (local APIC pin).
MPC_INTSRC_FORMAT = "<BBHBBBB"
MPC_INTSRC_SIZE = struct.calcsize(MPC_INTSRC_FORMAT)
MPC_LINTSRC_FORMAT = MPC_INTSRC_FORMAT
MPC_LINTSRC_SIZE = MPC_INTSRC_SIZE
#: Interrupt types (table 4-11): vectored, NMI, SMI, 8259-supplied vector.
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = 0, 1, 2, 3
#: Flags (tables 4-10, 4-12): polarity and trigger mode "conform to the bus".
MP_IRQFLAG_CONFORMS = 0
#: ISA IRQs routed through the I/O APIC: 0..15, each to the pin of the same number.
ISA_IRQ_COUNT = 16
#: Destination local APIC ID meaning "all local APICs" (4.3.5).
MP_APIC_ALL = 0xFF
LINT0, LINT1 = 0, 1

# --- Sizes and limits ----------------------------------------------------------------------------
#: Everything but the processor entries.
_FIXED_SIZE = (MPF_SIZE + MPC_SIZE + MPC_BUS_SIZE + MPC_IOAPIC_SIZE
               + ISA_IRQ_COUNT * MPC_INTSRC_SIZE + 2 * MPC_LINTSRC_SIZE)
#: xAPIC IDs are 8 bits, 0xFF is the broadcast ID, and the I/O APIC takes the ID after
#: the last processor's: at most 254 processors (IDs 0..253, I/O APIC 254).
MAX_APIC_CPUS = 254
#: The floating pointer and the table both live in the EBDA's last KiB, which ends where
#: RAM ends below 640 KiB (layout.LOW_RAM_END): that bounds the number of processors
#: ((1024 - 220) // 20 = 40 with the layout of today).
MAX_CPUS = min(MAX_APIC_CPUS,
               (layout.LOW_RAM_END - layout.EBDA_START - _FIXED_SIZE) // MPC_CPU_SIZE)


def table_size(cpu_count: int) -> int:
    """Bytes written at layout.EBDA_START for ``cpu_count`` vCPUs (pointer + table)."""
    return _FIXED_SIZE + cpu_count * MPC_CPU_SIZE


assert MPF_SIZE == 16 and MPC_SIZE == 44 and MPC_CPU_SIZE == 20           # spec 4.1-4.3.1
assert MPC_BUS_SIZE == MPC_IOAPIC_SIZE == MPC_INTSRC_SIZE == 8            # spec 4.3.2-4.3.5
assert layout.EBDA_START % 16 == 0                # 4.1: the pointer is paragraph-aligned
assert 1 <= MAX_CPUS and layout.EBDA_START + table_size(MAX_CPUS) <= layout.LOW_RAM_END


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte counted as 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def write_mptable(mem: GuestMemory, cpu_count: int) -> None:
    """Write the MP floating pointer and configuration table at layout.EBDA_START.

    Args:
        mem: guest RAM; must contain the EBDA.
        cpu_count: number of vCPUs, APIC IDs 0..cpu_count-1, vCPU 0 the BSP.
    Raises:
        ValueError: cpu_count is not in 1..MAX_CPUS.
    """
    if not 1 <= cpu_count <= MAX_CPUS:
        raise ValueError(f"the MP table describes 1 to {MAX_CPUS} vCPUs, not {cpu_count}")
    ioapic_id = cpu_count              # first APIC ID after the processors'

    entries = []
    for apic_id in range(cpu_count):   # 4.3.1
        flags = CPU_FLAG_ENABLED | (CPU_FLAG_BSP if apic_id == 0 else 0)
        entries.append(struct.pack(MPC_CPU_FORMAT, MP_PROCESSOR, apic_id, LAPIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURE_FPU | CPU_FEATURE_APIC))
    entries.append(struct.pack(MPC_BUS_FORMAT, MP_BUS, BUS_ID_ISA, BUS_TYPE_ISA))   # 4.3.2
    entries.append(struct.pack(MPC_IOAPIC_FORMAT, MP_IOAPIC, ioapic_id, IOAPIC_VERSION,
                               IOAPIC_FLAG_ENABLED, layout.IOAPIC_START))             # 4.3.3
    for irq in range(ISA_IRQ_COUNT):   # 4.3.4: ISA IRQ n -> pin n (KVM's default routing)
        entries.append(struct.pack(MPC_INTSRC_FORMAT, MP_INTSRC, MP_INT, MP_IRQFLAG_CONFORMS,
                                   BUS_ID_ISA, irq, ioapic_id, irq))
    for kind, lint in ((MP_EXTINT, LINT0), (MP_NMI, LINT1)):    # 4.3.5
        entries.append(struct.pack(MPC_LINTSRC_FORMAT, MP_LINTSRC, kind, MP_IRQFLAG_CONFORMS,
                                   BUS_ID_ISA, 0, MP_APIC_ALL, lint))
    body = b"".join(entries)

    table_addr = layout.EBDA_START + MPF_SIZE      # the table follows the pointer
    header = dict(signature=MPC_SIGNATURE, length=MPC_SIZE + len(body), spec=MP_SPEC_REV_1_4,
                  oem=MPC_OEM_ID, product=MPC_PRODUCT_ID, oem_ptr=0, oem_size=0,
                  count=len(entries), lapic=layout.LAPIC_START, ext_length=0, ext_checksum=0)

    def pack_header(checksum: int) -> bytes:   # 4.2, field order of MPC_FORMAT
        h = header
        return struct.pack(MPC_FORMAT, h["signature"], h["length"], h["spec"], checksum, h["oem"],
                           h["product"], h["oem_ptr"], h["oem_size"], h["count"], h["lapic"],
                           h["ext_length"], h["ext_checksum"], 0)

    # 4.2: the base table (header + entries) sums to 0; no extended table.
    table = pack_header(_checksum(pack_header(0) + body)) + body

    def pack_mpf(checksum: int) -> bytes:      # 4.1
        return struct.pack(MPF_FORMAT, MPF_SIGNATURE, table_addr, MPF_SIZE // 16, MP_SPEC_REV_1_4,
                           checksum, MPF_FEATURE1_CONFIG_TABLE, MPF_FEATURE2_VIRTUAL_WIRE, bytes(3))

    mpf = pack_mpf(_checksum(pack_mpf(0)))     # 4.1: all 16 bytes sum to 0
    assert len(mpf) + len(table) == table_size(cpu_count)
    mem.write(layout.EBDA_START, mpf + table)
