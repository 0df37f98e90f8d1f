"""Detects hosts whose KVM interprets guest ring-0 code (docs/emulation-only-hosts.md).

On such a host (e.g. a nested, paravirtual KVM backend) guest kernel code runs through
KVM's instruction emulator at about a million instructions per second, CPUID is not
filtered, some instructions cannot be emulated and hypercalls hang. pyvmm measures
this rather than guessing from module names: a probe guest runs a tight ring-0 loop
and the loop's speed decides. The probe takes ~0.1 ms on ordinary hardware and
~20-40 ms on an emulation-only host, so its verdict is kept for the host's boot: a
small file in the cache directory keyed by the kernel's boot id
(/proc/sys/kernel/random/boot_id), which changes whenever the host reboots (the only
time its KVM can change kind). ``PYVMM_PROBE=always`` measures every time.
"""

from __future__ import annotations

import struct
import time
from collections import namedtuple

from vmm import kvm as kvmlib
from vmm.arch.x86_64 import cpu, layout
from vmm.memory import GuestMemory

#: Iterations of the probe loop (two instructions each).
PROBE_LOOPS = 20_000
#: Below this many million instructions per second, ring-0 code is being interpreted.
#: Hardware runs the loop at >1000 MIPS, the emulator at ~1 MIPS.
EMULATED_MIPS_THRESHOLD = 50.0


def _probe_code(loops: int) -> bytes:
    return (b"\xb9" + struct.pack("<I", loops)   # mov ecx, loops
            + b"\xff\xc9"                          # 1: dec ecx
            + b"\x75\xfc"                          # jnz 1b
            + b"\xe6" + bytes([layout.DEBUG_EXIT_PORT])  # out DEBUG_EXIT_PORT, al
            + b"\xf4")                             # hlt


class HostProfile(namedtuple("HostProfile", "emulated mips tsc_khz")):
    """What the probe found: ``emulated`` (guest ring-0 code is interpreted), ``mips``
    (measured ring-0 speed, million instructions/s), ``tsc_khz`` (host TSC frequency as
    KVM reports it, 0 if unknown). A namedtuple: dataclasses cost start-up time."""

    __slots__ = ()

    def describe(self) -> str:
        kind = "emulation-only (guest kernel code is interpreted)" if self.emulated else "hardware-assisted"
        return f"KVM on this host is {kind}: ring-0 probe ran at {self.mips:,.1f} MIPS"


_cached: HostProfile | None = None
_VERDICT_VERSION = 1


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def verdict_path() -> str:
    import os
    from vmm.paths import cache_dir
    return os.path.join(cache_dir(), "host-probe")


def _load_verdict(boot_id: str) -> HostProfile | None:
    from vmm.paths import read_records
    try:
        v = dict(read_records(verdict_path()))
        if v.get("version") != str(_VERDICT_VERSION) or v.get("boot_id") != boot_id:
            return None
        mips, tsc = float(v["mips"]), int(v["tsc_khz"])
    except (OSError, ValueError, KeyError):
        return None
    return HostProfile(emulated=mips < EMULATED_MIPS_THRESHOLD, mips=mips, tsc_khz=tsc)


def _save_verdict(boot_id: str, host: HostProfile) -> None:
    from vmm.paths import write_records
    try:
        write_records(verdict_path(), [("version", str(_VERDICT_VERSION)), ("boot_id", boot_id),
                                       ("mips", repr(host.mips)), ("tsc_khz", str(host.tsc_khz))])
    except (OSError, ValueError):
        pass  # an unwritable cache only means measuring again next time


def probe(kvm: kvmlib.Kvm | None = None) -> HostProfile:
    """This host's profile: measured once per host boot (kept in the cache directory
    by boot id; see the module docstring), and once per process at most."""
    global _cached
    if _cached is not None:
        return _cached
    import os
    boot_id = None if os.environ.get("PYVMM_PROBE") == "always" else _boot_id()
    if boot_id is not None:
        host = _load_verdict(boot_id)
        if host is not None:
            _cached = host
            return host
    _cached = measure(kvm)
    if boot_id is not None:
        _save_verdict(boot_id, _cached)
    return _cached


def measure(kvm: kvmlib.Kvm | None = None) -> HostProfile:
    """Run the probe guest now (no caching)."""
    from vmm.vcpu import native
    shim = native()
    own = kvm is None
    kvm = kvm or kvmlib.Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(2 * layout.MiB)
    vcpu = None
    try:
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        mem_cdata = shim.ffi.from_buffer(mem.host_buffer)
        vm.set_user_memory_region(0, mem.size, int(shim.ffi.cast("uintptr_t", mem_cdata)))
        entry = 0x1000 * 64
        mem.write(entry, _probe_code(PROBE_LOOPS))
        cpu.write_boot_tables(mem)
        vcpu = vm.create_vcpu(0)
        cpu.setup_long_mode(vcpu, entry)
        run_cdata = shim.ffi.from_buffer(vcpu.run_page)
        reason = shim.ffi.new("int32_t *")
        t0 = time.perf_counter()
        shim.lib.shim_bare_run(vcpu.fd, run_cdata, layout.DEBUG_EXIT_PORT, reason)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        tsc = vcpu.tsc_khz()
        shim.ffi.release(run_cdata)
        shim.ffi.release(mem_cdata)
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        mem.close()
        if own:
            kvm.close()
    mips = 2 * PROBE_LOOPS / elapsed / 1e6
    return HostProfile(emulated=mips < EMULATED_MIPS_THRESHOLD, mips=mips, tsc_khz=tsc)
