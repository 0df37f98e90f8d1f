"""What booting Linux needs besides the kernel: its command line and the CPU profile.

Shared by ``pyvmm boot`` and the Python API, so both boot a guest the same way.
"""

from __future__ import annotations

from vmm.cpuprofile import HostQuirks

#: Kernel command line for a microVM: serial console (ttyS0; ttyS1 is the control
#: channel of disposable guests), reset through the i8042 (the only reset line pyvmm
#: models), reboot at once on panic (pyvmm reports it), no PCI, no modules, no KASLR
#: (the kernel runs where it was loaded), and the i8042 options that keep Linux from
#: probing an AUX port and PNP.
DEFAULT_CMDLINE = ("console=ttyS0 reboot=k panic=-1 pci=off nomodule nokaslr 8250.nr_uarts=2 "
                   "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd")


class LinuxSetup:
    """The command line, the HostQuirks and CPU profile name, and ``notes``: things worth
    telling the user once (e.g. that the host is emulation-only)."""

    # A plain class, not a dataclass: importing dataclasses costs start-up time.
    def __init__(self, cmdline: str, quirks: HostQuirks | None = None, profile: str = "host",
                 notes: list[str] | None = None):
        self.cmdline = cmdline
        self.quirks = quirks if quirks is not None else HostQuirks()
        self.profile = profile
        self.notes = notes if notes is not None else []

    def __repr__(self) -> str:
        return (f"LinuxSetup(cmdline={self.cmdline!r}, quirks={self.quirks!r}, "
                f"profile={self.profile!r}, notes={self.notes!r})")


def prepare(cpu_profile: str = "auto", cpus: int = 1, *, root: str | None = None,
            extra: str = "", replace: str | None = None) -> LinuxSetup:
    """The command line and host quirks for a Linux guest on this host.

    Args:
        cpu_profile: "auto" (probe the host), "host" or "safe" (vmm.cpuprofile).
        cpus: vCPU count (SMP needs extra options on emulation-only hosts).
        root: e.g. "root=/dev/vda rw", or None.
        extra: appended to the default command line.
        replace: use exactly this command line instead (the CPU profile's quirk
            handling in the VMM still applies).
    """
    from vmm import hostcheck
    from vmm.cpuprofile import select

    host = hostcheck.probe() if cpu_profile == "auto" else None
    profile = select(cpu_profile, host, cpus)
    notes = []
    if host is not None and host.emulated:
        notes.append(f"note: {host.describe()}; using CPU profile '{profile.name}' "
                     "(override with --cpu-profile)")
        if "noxsave" in profile.cmdline:
            notes.append("note: on this host AVX registers are not preserved between guest "
                         "processes; the default guest keeps glibc off AVX (README, "
                         "\"Known problems\")")
    if replace is not None:
        cmdline = replace
    else:
        cmdline = " ".join(x for x in (DEFAULT_CMDLINE, " ".join(profile.cmdline), root or "", extra) if x)
    return LinuxSetup(cmdline, profile.quirks, profile.name, notes)
