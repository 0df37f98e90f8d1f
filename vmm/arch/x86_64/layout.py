"""Every guest physical address pyvmm uses on x86-64, one named constant each.

The low 1 MiB follows the PC conventions Linux expects (real-mode IVT/BDA at 0, EBDA
below 640 KiB, legacy video/BIOS hole 0xa0000-0xfffff). Everything the VMM itself
writes for the boot CPU (GDT, page tables, zero page, command line) lives in the
first 640 KiB, below the EBDA, where Linux treats it as ordinary RAM after boot.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- Boot CPU structures written by the VMM (vmm/arch/x86_64/cpu.py) -------------
#: Global descriptor table: two nulls, 64-bit code (0x10), data (0x18), TSS (0x20);
#: Linux reloads its own.
BOOT_GDT_START = 0x500
#: An empty IDT (after the GDT's five entries): any exception before the guest
#: installs its own is a triple fault.
BOOT_IDT_START = 0x530
#: Linux boot protocol "zero page" (struct boot_params), pointed to by RSI.
ZERO_PAGE_START = 0x7000
#: Initial stack for the boot CPU (grows down, below the page tables).
BOOT_STACK_POINTER = 0x8FF0
#: Identity-mapped page tables for the first 4 GiB with 2 MiB pages:
#: one PML4, one PDPT and four page directories.
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000
PD_COUNT = 4

# --- Kernel command line --------------------------------------------------------
CMDLINE_START = 0x20000
#: Bytes reserved for the command line, including its terminating NUL.
CMDLINE_MAX_SIZE = 0x10000

# --- Legacy PC regions ------------------------------------------------------------
#: Extended BIOS data area; the MP table (SMP) is placed here.
EBDA_START = 0x9FC00
#: Start of the legacy VGA/BIOS hole: not RAM in the e820 map.
LOW_RAM_END = 0xA0000
#: Where protected-mode kernels and test guests are loaded ("high memory").
HIMEM_START = 0x100000

# --- The hole below 4 GiB for MMIO devices -----------------------------------------
#: Guest RAM above this address is placed at 4 GiB instead (see vmm/memory.py).
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
#: virtio-mmio windows, one 4 KiB page per device, from here up.
VIRTIO_MMIO_START = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000
#: Test-device MMIO window used by the bare-metal test guests.
TEST_MMIO_START = 0xE000_0000
TEST_MMIO_SIZE = 0x1000
#: Local APIC and I/O APIC (emulated in-kernel; listed so nothing else lands there).
IOAPIC_START = 0xFEC0_0000
LAPIC_START = 0xFEE0_0000

# --- KVM private areas (KVM_SET_TSS_ADDR / KVM_SET_IDENTITY_MAP_ADDR) ---------------
#: Three pages KVM needs for real-mode emulation on Intel; placed inside the MMIO gap.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

# --- Legacy I/O ports -----------------------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
#: Second UART (ttyS1): the control channel of disposable guests (vmm/guest.py).
COM2_PORT = 0x2F8
COM2_IRQ = 3
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
CMOS_INDEX_PORT = 0x70
CMOS_DATA_PORT = 0x71
#: Debug-exit port for test guests: a byte written here stops the VM with that status.
DEBUG_EXIT_PORT = 0xF4
#: First IRQ given to virtio-mmio devices (GSI 5, 6, ...; device i gets BASE + i).
VIRTIO_IRQ_BASE = 5
#: Last IRQ a virtio-mmio device may get: a guest without an MP table (one vCPU) has
#: only the 8259 PICs' 16 lines, and the MP table routes ISA IRQs 0..15 only
#: (vmm/arch/x86_64/mptable.py). 8 (RTC) and 12 (PS/2 aux) are free here: the CMOS model
#: raises no interrupt and Linux is told i8042.noaux.
VIRTIO_IRQ_LAST = 15

# --- virtio-mmio devices: window i at VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE, IRQ
# VIRTIO_IRQ_BASE + i (vmm/machine.py Machine.attach_virtio) ---------------------------
#: How many virtio-mmio devices one VM can have: one IRQ each, and the windows must end
#: below the test device's.
VIRTIO_MAX_DEVICES = min(VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1,
                         (TEST_MMIO_START - VIRTIO_MMIO_START) // VIRTIO_MMIO_SIZE)
