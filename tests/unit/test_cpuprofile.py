"""CPU profiles and the per-vCPU CPUID table."""

from __future__ import annotations

import pytest

from tests.conftest import requires_kvm
from vmm.arch.x86_64 import cpuid
from vmm.cpuprofile import SAFE_CLEARCPUID, select
from vmm.hostcheck import HostProfile
from vmm.kvm import structs as S

EMULATED = HostProfile(emulated=True, mips=1.1, tsc_khz=2_600_000)
HARDWARE = HostProfile(emulated=False, mips=3000.0, tsc_khz=2_600_000)


def test_auto_picks_safe_on_emulation_only_hosts():
    p = select("auto", EMULATED)
    assert p.name == "safe"
    assert f"clearcpuid={','.join(SAFE_CLEARCPUID)}" in p.cmdline
    for opt in ("nofsgsbase", "noxsave", "nopv", "tsc_early_khz=2600000"):
        assert opt in p.cmdline
    assert "nopvspin" not in p.cmdline
    assert p.quirks.complete_int3 and p.quirks.complete_fwait


def test_auto_picks_host_on_hardware():
    p = select("auto", HARDWARE)
    assert (p.name, p.cmdline) == ("host", ())
    assert not p.quirks.complete_int3 and not p.quirks.complete_fwait


@pytest.mark.parametrize("host, want_avx_note", [(EMULATED, True), (HARDWARE, False)])
def test_prepare_reports_the_host_and_its_avx_caveat(monkeypatch, host, want_avx_note):
    """linux.prepare("auto") says once why it picked the safe profile, and that AVX
    state is not preserved between guest processes there (README, "Known problems")."""
    from vmm import hostcheck, linux
    monkeypatch.setattr(hostcheck, "probe", lambda: host)
    setup = linux.prepare("auto")
    assert ("noxsave" in setup.cmdline.split()) == want_avx_note
    assert any("emulation-only" in n and "'safe'" in n for n in setup.notes) == want_avx_note
    assert any("AVX" in n for n in setup.notes) == want_avx_note


def test_forced_profiles_and_smp():
    assert select("host", EMULATED).name == "host"
    safe = select("safe", None, cpus=2)
    assert "nopvspin" in safe.cmdline
    assert not any(o.startswith("tsc_early_khz") for o in safe.cmdline)  # unknown TSC
    with pytest.raises(ValueError):
        select("fast", None)


def fake_supported():
    leaves = []
    for fn, idx in ((0, 0), (1, 0), (4, 0), (4, 1), (0xA, 0), (0xB, 0), (0xB, 1), (0xB, 2),
                    (0x40000000, 0), (0x80000001, 0)):
        e = S.kvm_cpuid_entry2(function=fn, index=idx, eax=0xAAAA5555, ebx=0x12345678,
                               ecx=0x11, edx=0x22)
        leaves.append(e)
    return leaves


@pytest.mark.parametrize("count", [1, 2, 4])
def test_cpuid_topology_and_apic_ids(count):
    for index in range(count):
        table = {(e.function, e.index): e for e in cpuid.vcpu_cpuid(fake_supported(), index, count)}
        leaf1 = table[(1, 0)]
        assert leaf1.ebx >> 24 == index                    # initial APIC ID
        assert (leaf1.ebx >> 16) & 0xFF == count            # logical processors
        assert leaf1.ecx & cpuid.CPUID_1_ECX_HYPERVISOR
        assert bool(leaf1.edx & cpuid.CPUID_1_EDX_HTT) == (count > 1)
        assert table[(4, 0)].eax >> 26 == count - 1
        assert table[(0xA, 0)].eax == 0                     # no PMU
        assert table[(0xB, 0)].ebx == 1 and table[(0xB, 1)].ebx == count
        assert all(table[(0xB, i)].edx == index for i in range(3))  # x2APIC ID
        assert table[(0x40000000, 0)].eax == 0xAAAA5555     # KVM leaves passed on
    src = fake_supported()
    cpuid.vcpu_cpuid(src, 1, 2)
    assert src[1].ebx == 0x12345678                         # input not modified


@requires_kvm
def test_host_probe_measures_something_plausible():
    from vmm import hostcheck
    p = hostcheck.probe()
    assert p.mips > 0
    assert p.emulated == (p.mips < hostcheck.EMULATED_MIPS_THRESHOLD)
    assert "MIPS" in p.describe()
