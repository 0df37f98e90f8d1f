"""The records a VM is built from and ends with: MachineConfig, DiskConfig, VmExit.

Plain classes, not dataclasses: importing dataclasses costs ~8 ms of the VMM's
start-up (issue #2 budgets 60 ms from exec to the first KVM_RUN). This module sits
below vmm.machine, so the CLI and the Python API can build a config without importing
the machine, and nothing here imports anything that imports it back.
"""

from __future__ import annotations

import enum
from pathlib import Path
from collections.abc import Callable

from vmm.cpuprofile import HostQuirks
from vmm.vcpu import default_loop


class ExitReason(enum.Enum):
    POWEROFF = "poweroff"
    REBOOT = "reboot"
    DEBUG_EXIT = "debug-exit"
    PANIC = "panic"
    TRIPLE_FAULT = "triple-fault"
    EMULATION_FAILURE = "emulation-failure"
    STOPPED = "stopped"
    ERROR = "error"
    #: Ended after saving a snapshot (``pyvmm boot --snapshot-on``).
    SNAPSHOTTED = "snapshotted"


#: pyvmm's exit status for each way a VM can end (documented in the README).
#: A debug-exit ends with the byte the guest wrote instead.
EXIT_STATUS = {
    ExitReason.POWEROFF: 0,
    ExitReason.REBOOT: 0,
    ExitReason.ERROR: 1,
    ExitReason.PANIC: 3,
    ExitReason.TRIPLE_FAULT: 4,
    ExitReason.EMULATION_FAILURE: 5,
    ExitReason.STOPPED: 130,
    ExitReason.SNAPSHOTTED: 0,
}


class VmExit:
    """Why and how a VM ended: ``reason``, the exit ``status``, a one-line ``detail``."""

    __slots__ = ("reason", "status", "detail")

    def __init__(self, reason: ExitReason, status: int, detail: str = ""):
        self.reason = reason
        self.status = status
        self.detail = detail

    def __repr__(self) -> str:
        return f"VmExit(reason={self.reason!r}, status={self.status!r}, detail={self.detail!r})"


class DiskConfig:
    """One virtio-blk disk (the CLI's ``--disk PATH[,ro][,snapshot][,serial=ID][,cache=MODE]``).

    ``snapshot``: writes go to a throwaway overlay; the image itself is never modified.
    ``path=None``: an empty drive, for a disk inserted later (``Machine.insert_disk``,
    vmm/disk/empty.py). ``inserted``: this disk went into such a drive after boot (a
    restore rebuilds the drive as it was negotiated; set by ``Machine.insert_disk``).
    """

    def __init__(self, path: Path | None, read_only: bool = False, serial: str | None = None,
                 cache: str = "writeback", snapshot: bool = False, inserted: bool = False):
        self.path = path
        self.read_only = read_only
        self.serial = serial
        self.cache = cache
        self.snapshot = snapshot
        self.inserted = inserted

    @classmethod
    def empty(cls) -> "DiskConfig":
        """An empty drive."""
        return cls(None)

    def __repr__(self) -> str:
        return (f"DiskConfig(path={self.path!r}, read_only={self.read_only}, "
                f"serial={self.serial!r}, cache={self.cache!r}, snapshot={self.snapshot}, "
                f"inserted={self.inserted})")


def _discard(data: bytes) -> None:
    pass


class MachineConfig:
    """What to build. Keyword arguments, all but ``kernel`` optional:

    kernel: the kernel or test-guest file.
    mem_size: guest RAM in bytes (default 256 MiB). cpus: vCPUs (default 1).
    kind: "raw" (a bare-metal ELF started in long mode with no boot protocol) or
        "linux" (the Linux x86 boot protocol: zero page, command line, initrd).
    initrd, cmdline: Linux only.
    kernel_mode: loader path for a bzImage: "auto", "elf" (decompress on the host) or
        "bzimage".
    loop: "shim" or "python" (default: vcpu.default_loop()).
    console: where guest serial output goes (called from the console thread).
    markers: console line prefixes to timestamp in Machine.times, {b"pyvmm: ready": "ready"}.
    quirks: HostQuirks (vmm.cpuprofile). disks: a list of DiskConfig.
    system_map: System.map naming kernel functions in diagnostics (default: the ELF's
        own symbols, or a System.map beside the kernel file).
    serial2: where bytes the guest writes to the second UART (ttyS1) go; Linux guests
        only. Called on a vCPU thread. Host-to-guest bytes: Machine.serial2.enqueue_input.
    cpu_profile: the name of the CPU profile the command line was made for ("host",
        "safe"; "" if none), recorded in snapshots (a restore must match it).
    net: a NetConfig (one virtio-net card), or None: no network (the default).
    """

    def __init__(self, kernel: Path, *, mem_size: int = 256 << 20, cpus: int = 1,
                 kind: str = "raw", initrd: Path | None = None, cmdline: str = "",
                 kernel_mode: str = "auto", loop: str | None = None,
                 console: Callable[[bytes], None] = _discard,
                 markers: dict[bytes, str] | None = None, quirks: HostQuirks | None = None,
                 disks: list[DiskConfig] | None = None, system_map: Path | None = None,
                 serial2: Callable[[bytes], None] = _discard, cpu_profile: str = "",
                 net: "NetConfig | None" = None):
        self.kernel = kernel
        self.mem_size = mem_size
        self.cpus = cpus
        self.kind = kind
        self.initrd = initrd
        self.cmdline = cmdline
        self.kernel_mode = kernel_mode
        self.loop = loop if loop is not None else default_loop()
        self.console = console
        self.markers = markers if markers is not None else {}
        self.quirks = quirks if quirks is not None else HostQuirks()
        self.disks = disks if disks is not None else []
        self.system_map = system_map
        self.serial2 = serial2
        self.cpu_profile = cpu_profile
        self.net = net

    def __repr__(self) -> str:
        return (f"MachineConfig(kernel={self.kernel!r}, mem_size={self.mem_size}, "
                f"cpus={self.cpus}, kind={self.kind!r}, disks={self.disks!r})")


#: NICs made in this process so far (each gets its own MAC: NetConfig).
_nic_count = [0]


class NetConfig:
    """The virtio-net card (``--net user`` or ``--net tap=NAME``; see vmm.net).

    mode: "user" (passt) or "tap". tap: the TAP device's name. publish: host ports
    forwarded to the guest (vmm.net.Publish, ``user`` only). mac: 6 bytes; by default a
    locally administered 52:54:xx:xx:xx:xx from this process's pid and a counter, so it
    is stable for the VM (a restart with the same config keeps it) and distinct between
    the VMs of a host at one time.
    """

    def __init__(self, mode: str, *, tap: str = "", publish=(), mac: bytes | None = None):
        import os
        self.mode = mode
        self.tap = tap
        self.publish = list(publish)
        if mac is None:
            _nic_count[0] += 1
            n = (os.getpid() & 0xFFFFFF) << 8 | (_nic_count[0] & 0xFF)
            mac = b"\x52\x54" + n.to_bytes(4, "big")
        self.mac = mac

    def __repr__(self) -> str:
        return (f"NetConfig(mode={self.mode!r}, tap={self.tap!r}, publish={self.publish!r}, "
                f"mac={':'.join(f'{b:02x}' for b in self.mac)})")
