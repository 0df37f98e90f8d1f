"""KVM ABI structures (x86-64), transcribed from <linux/kvm.h> as ctypes types.

Each structure's size feeds the ioctl number that carries it (see ioctls.py), so a
transcription mistake changes the number and KVM rejects the call; tests/unit/
test_kvm_abi.py also compiles a C program against the system's <linux/kvm.h> and
compares every size and ioctl number with these.
"""

import ctypes as C

u8, u16, u32, u64, s32 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64, C.c_int32


class Struct(C.Structure):
    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


class kvm_userspace_memory_region(Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_regs(Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(Struct):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class kvm_fpu(Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Struct):
    """Header only; the entries follow (see msrs_buffer)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(Struct):
    """Header only; the entries follow (see cpuid_buffer)."""
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_pit_config(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irq_level(Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class _events_exception(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _events_interrupt(Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(Struct):
    _fields_ = [("exception", _events_exception), ("interrupt", _events_interrupt),
                ("nmi", _events_nmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", _events_smi), ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_ioeventfd(Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_irqfd(Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class kvm_lapic_state(Struct):
    _fields_ = [("regs", u8 * 1024)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", u32)]


class kvm_xsave(Struct):
    """The legacy 4 KiB XSAVE area (KVM_GET/SET_XSAVE); enough while KVM_CAP_XSAVE2
    reports 4096 (no dynamically enabled feature such as AMX)."""
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


#: KVM_MAX_XCRS in <asm/kvm.h>.
KVM_MAX_XCRS = 16


class kvm_xcrs(Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_debugregs(Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_pit_channel_state(Struct):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", C.c_int64)]


class kvm_pit_state2(Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_clock_data(Struct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_pic_state(Struct):
    _fields_ = [(n, u8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
        "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


#: KVM_IOAPIC_NUM_PINS in <asm/kvm.h>.
KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(Struct):
    """The redirection entries are kept as the raw 64-bit ``bits`` of their union."""
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32),
                ("pad", u32), ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class _irqchip_union(C.Union):
    _fields_ = [("dummy", C.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Struct):
    """One in-kernel interrupt controller: chip_id KVM_IRQCHIP_PIC_MASTER (0),
    KVM_IRQCHIP_PIC_SLAVE (1) or KVM_IRQCHIP_IOAPIC (2)."""
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_run_header(Struct):
    """The fixed part of the shared kvm_run page (the exit union starts at 32)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64)]


#: Offset of the exit-information union inside struct kvm_run.
KVM_RUN_EXIT_UNION = C.sizeof(kvm_run_header)


def array_buffer(header_type, entry_type, count: int):
    """A ctypes structure: ``header_type`` followed by ``count`` ``entry_type`` entries."""
    class Buffer(Struct):
        _fields_ = [("header", header_type), ("entries", entry_type * count)]
    return Buffer()
