"""Our ctypes transcription of <linux/kvm.h> against the system header itself."""

from __future__ import annotations

import ctypes as C
import shutil
import subprocess

import pytest

from vmm.kvm import ioctls as K
from vmm.kvm import structs as S

STRUCTS = ["kvm_userspace_memory_region", "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_fpu",
           "kvm_msr_entry", "kvm_msrs", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_pit_config",
           "kvm_irq_level", "kvm_vcpu_events", "kvm_ioeventfd", "kvm_irqfd", "kvm_lapic_state",
           # snapshot state
           "kvm_msr_list", "kvm_mp_state", "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_debugregs",
           "kvm_pit_channel_state", "kvm_pit_state2", "kvm_clock_data", "kvm_pic_state",
           "kvm_ioapic_state", "kvm_irqchip"]
IOCTLS = [n for n in dir(K) if n.startswith("KVM_") and not n.startswith(("KVM_CAP_", "KVM_EXIT_",
          "KVM_INTERNAL", "KVM_SYSTEM_EVENT", "KVM_IOEVENTFD_FLAG", "KVM_VCPUEVENT"))]
#: Every capability number and named constant we transcribed (KVM_CLOCK_*, KVM_MP_STATE_*
#: and KVM_IRQCHIP_* are in IOCTLS already: they carry no excluded prefix).
CONSTANTS = ([n for n in dir(K) if n.startswith("KVM_CAP_")]
             + ["KVM_MAX_XCRS", "KVM_IOAPIC_NUM_PINS"])
#: (struct, field) offsets that a size check alone would not catch.
OFFSETS = [("kvm_irqchip", "chip"), ("kvm_pit_channel_state", "count_load_time"),
           ("kvm_pit_state2", "flags"), ("kvm_clock_data", "flags"),
           ("kvm_clock_data", "realtime"), ("kvm_xcrs", "xcrs"), ("kvm_debugregs", "dr7"),
           ("kvm_ioapic_state", "redirtbl"), ("kvm_pic_state", "irq_base")]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    lines += [f'printf("{s} %zu\\n", sizeof(struct {s}));' for s in STRUCTS]
    lines += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in IOCTLS + CONSTANTS]
    lines += [f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for s, f in OFFSETS]
    lines += ['printf("run_exit_union %zu\\n", offsetof(struct kvm_run, io));', "return 0;}"]
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes_match_the_kernel_header(header_values, name):
    assert C.sizeof(getattr(S, name)) == header_values[name]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers_match_the_kernel_header(header_values, name):
    assert getattr(K, name) == header_values[name], f"{name}: {getattr(K, name):#x}"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants_match_the_kernel_header(header_values, name):
    value = getattr(K, name) if hasattr(K, name) else getattr(S, name)
    assert value == header_values[name]


@pytest.mark.parametrize("struct,field", OFFSETS)
def test_field_offsets_match_the_kernel_header(header_values, struct, field):
    assert getattr(S, struct).__dict__[field].offset == header_values[f"{struct}.{field}"]


def test_exit_union_offset(header_values):
    assert S.KVM_RUN_EXIT_UNION == header_values["run_exit_union"]
