"""KVM ioctl request numbers, computed from the structures they carry.

Linux's _IOC encoding (include/uapi/asm-generic/ioctl.h): bits 0-7 number,
8-15 type, 16-29 argument size, 30-31 direction.
"""

import ctypes as C

from vmm.kvm import structs as S

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr, t):
    return _ioc(_IOC_READ, nr, C.sizeof(t))


def _iow(nr, t):
    return _ioc(_IOC_WRITE, nr, C.sizeof(t))


def _iowr(nr, t):
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


# System (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, S.kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, S.kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, S.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, S.kvm_irqchip)      # sic: <linux/kvm.h> declares it _IOR
KVM_IRQFD = _iow(0x76, S.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, S.kvm_pit_config)
KVM_SET_CLOCK = _iow(0x7B, S.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, S.kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, S.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, S.kvm_pit_state2)
KVM_IOEVENTFD = _iow(0x79, S.kvm_ioeventfd)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, S.kvm_regs)
KVM_SET_REGS = _iow(0x82, S.kvm_regs)
KVM_GET_SREGS = _ior(0x83, S.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, S.kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, S.kvm_msrs)
KVM_SET_MSRS = _iow(0x89, S.kvm_msrs)
KVM_GET_FPU = _ior(0x8C, S.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, S.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, S.kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, S.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, S.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, S.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, S.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, S.kvm_debugregs)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, S.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, S.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, S.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, S.kvm_xcrs)

# Capabilities (KVM_CHECK_EXTENSION arguments)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

# Exit reasons (struct kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1

# struct kvm_clock_data.flags (KVM_CAP_ADJUST_CLOCK)
KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# struct kvm_mp_state.mp_state (x86 values)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# struct kvm_irqchip.chip_id
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
