"""CPU profiles: what pyvmm tells a Linux guest about the CPU, per kind of host.

``host``: nothing extra — on hardware-assisted KVM the guest sees the filtered CPUID
table (vmm/arch/x86_64/cpuid.py) and everything works as on any VMM.

``safe``: for emulation-only hosts (vmm/hostcheck.py). There the guest's CPUID is the
host's whatever KVM_SET_CPUID2 says, so features KVM's instruction emulator cannot
execute are hidden on the kernel command line instead; hypercalls hang, so paravirt
features are off (``nopv``; ``nopvspin`` for SMP) and the TSC frequency is given
(``tsc_early_khz``) so Linux does not calibrate it against the PIT in interpreted
code; and the VMM completes ``int3`` and ``fwait`` when the emulator refuses them.

``auto`` (the default) picks ``safe`` when the host probe finds ring-0 code
interpreted, else ``host``.
"""

from __future__ import annotations

from collections import namedtuple

from vmm.hostcheck import HostProfile

PROFILES = ("auto", "host", "safe")

#: Features whose instructions KVM's emulator cannot execute (docs/emulation-only-hosts.md):
#: SMAP (clac/stac), CX16 (lock cmpxchg16b), POPCNT, XSAVE family, RDRAND/RDSEED.
SAFE_CLEARCPUID = ("smap", "cx16", "popcnt", "xsave", "rdrand", "rdseed")


class HostQuirks:
    """Instructions an emulation-only host refuses that the VMM completes itself.

    ``complete_int3``: 0xCC in 64-bit mode: RIP += 1, inject #BP.
    ``complete_fwait``: 0x9B: RIP += 1 (no x87 exception can be pending).
    """

    __slots__ = ("complete_int3", "complete_fwait")

    def __init__(self, complete_int3: bool = False, complete_fwait: bool = False):
        self.complete_int3 = complete_int3
        self.complete_fwait = complete_fwait

    def __repr__(self) -> str:
        return (f"HostQuirks(complete_int3={self.complete_int3}, "
                f"complete_fwait={self.complete_fwait})")


class CpuProfile(namedtuple("CpuProfile", "name cmdline quirks")):
    """``name``, the ``cmdline`` arguments it adds (a tuple), the HostQuirks it needs.
    A namedtuple: dataclasses cost start-up time."""

    __slots__ = ()

    def __new__(cls, name: str, cmdline: tuple[str, ...] = (), quirks: HostQuirks | None = None):
        return super().__new__(cls, name, tuple(cmdline), quirks or HostQuirks())


def select(requested: str, host: HostProfile | None, cpus: int = 1) -> CpuProfile:
    """The profile to use. ``host`` may be None only when ``requested`` is not "auto"."""
    if requested not in PROFILES:
        raise ValueError(f"unknown CPU profile {requested!r} (use {', '.join(PROFILES)})")
    name = requested
    if name == "auto":
        name = "safe" if host is not None and host.emulated else "host"
    if name == "host":
        return CpuProfile("host")
    args = [f"clearcpuid={','.join(SAFE_CLEARCPUID)}", "nofsgsbase", "noxsave", "nopv"]
    if cpus > 1:
        args.append("nopvspin")
    if host is not None and host.tsc_khz:
        args.append(f"tsc_early_khz={host.tsc_khz}")
    return CpuProfile("safe", tuple(args), HostQuirks(complete_int3=True, complete_fwait=True))
