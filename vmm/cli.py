"""pyvmm's command line: parse, build, run, map errors to exit codes. Kept thin.

Exit status: the guest's (0 after a power-off; a test guest's debug-exit byte), or
  1  VMM error (KVM unavailable, a bug)        3  guest kernel panic
  2  bad usage or input (one line on stderr)    4  guest triple fault
  5  an instruction KVM could not emulate       130  stopped (Ctrl-A x, SIGTERM, timeout)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from vmm import __version__, runcli
from vmm.errors import HostError, UserError

T0 = time.monotonic()

EXIT_VMM_ERROR = 1
EXIT_USAGE = 2


class UsageError(UserError):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A hackable virtual machine monitor on Linux KVM.")
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("boot", help="boot a kernel (default: the project's own Linux guest)")
    b.add_argument("kernel", nargs="?", help="bzImage or ELF vmlinux (or, with --raw, a bare-metal ELF)")
    b.add_argument("--mem", default="256M", help="guest RAM, e.g. 512M, 1G, 256 (MiB); default 256M")
    b.add_argument("--cpus", default="1", help="number of vCPUs (default 1)")
    b.add_argument("--raw", action="store_true",
                   help="KERNEL is a bare-metal ELF test guest: start it in long mode, no boot protocol")
    b.add_argument("--initrd", help="initramfs / initrd image")
    b.add_argument("--cmdline", default="", help="arguments appended to the default kernel command line")
    b.add_argument("--cmdline-replace", metavar="CMDLINE", help="use exactly this kernel command line")
    b.add_argument("--kernel-mode", choices=("auto", "elf", "bzimage"), default="auto",
                   help="bzImage loading: decompress on the host (elf), the kernel's own decompressor "
                        "(bzimage), or elf when possible (auto, default)")
    b.add_argument("--cpu-profile", choices=("auto", "host", "safe"), default="auto",
                   help="host: nothing hidden; safe: work around an emulation-only KVM; auto: detect (default)")
    b.add_argument("--on-reboot", choices=("exit", "restart"), default="exit",
                   help="what a guest reboot does (default: exit)")
    b.add_argument("--console-log", metavar="FILE", help="also write guest console output to FILE")
    b.add_argument("--system-map", metavar="FILE",
                   help="System.map naming kernel functions in crash diagnostics")
    b.add_argument("--timings", action="store_true", help="print a table of boot phases at exit")
    b.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the VM after this long")
    b.add_argument("--loop", choices=("shim", "python"), default=None,
                   help="vCPU run loop: the C shim (default) or the pure-Python twin")
    b.add_argument("--disk", action="append", default=[],
                   metavar="PATH[,ro][,snapshot][,serial=ID][,cache=MODE]",
                   help="a virtio-blk disk (repeatable; /dev/vda, /dev/vdb, ... in order); "
                        "snapshot: the guest may write, but PATH is never modified (writes "
                        "go to a temporary overlay, discarded when the VM ends); "
                        "cache is writeback (default), none or unsafe (flushes ignored)")
    b.add_argument("--root", action="store_true",
                   help="mount the first --disk as the root filesystem (root=/dev/vda)")

    m = sub.add_parser("mkfs", help="make an ext4 disk image from a host directory (no root needed)")
    m.add_argument("source", help="host directory to copy into the image ('-' for an empty filesystem)")
    m.add_argument("image", help="image file to create")
    m.add_argument("--size", help="image size, e.g. 64M (default: the directory's size plus room)")

    runcli.add_parser(sub)
    return p


def _disk(spec: str):
    """``PATH[,ro][,snapshot][,serial=ID][,cache=writeback|none|unsafe]`` -> DiskConfig."""
    from vmm.machine import DiskConfig
    path, *opts = spec.split(",")
    if not path:
        raise UsageError(f"--disk {spec!r}: no path")
    disk = DiskConfig(Path(path))
    for opt in opts:
        key, _, value = opt.partition("=")
        if opt == "ro":
            disk.read_only = True
        elif opt == "rw":
            disk.read_only = False
        elif opt == "snapshot":
            disk.snapshot = True
        elif key == "serial" and value:
            if len(value.encode()) > 20:
                raise UsageError(f"--disk {spec}: serial is at most 20 bytes")
            disk.serial = value
        elif key == "cache" and value in ("writeback", "none", "unsafe"):
            disk.cache = value
        else:
            raise UsageError(f"--disk {spec}: unknown option {opt!r} "
                             "(use ro, snapshot, serial=ID, cache=writeback|none|unsafe)")
    _check_file(path, "disk")
    return disk


def _err(console, message: str) -> None:
    if console is not None:
        console.end_line()
    print(f"pyvmm: {message}", file=sys.stderr, flush=True)


def _check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{what} {path}: is a directory")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{what} {path}: permission denied")
    return p


def _cpus(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--cpus must be a whole number, not {text!r}") from None
    if n < 1:
        raise UsageError(f"--cpus must be at least 1, not {n}")
    return n


def _mem(text: str) -> int:
    from vmm.memory import GuestMemoryError, MAX_MEM_SIZE, MIN_MEM_SIZE, parse_size
    try:
        size = parse_size(text)
    except GuestMemoryError as e:
        raise UsageError(f"--mem: {e}") from None
    if size < MIN_MEM_SIZE:
        raise UsageError(f"--mem {text}: at least {MIN_MEM_SIZE >> 20} MiB is needed")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > min(host, MAX_MEM_SIZE):
        raise UsageError(f"--mem {text}: more than this host's {host / (1 << 30):.1f} GiB of RAM")
    return size


def _check_cpus(cpus: int) -> None:
    from vmm.arch.x86_64.mptable import MAX_CPUS
    from vmm.kvm import Kvm
    with Kvm() as kvm:
        _, maximum = kvm.max_vcpus()
    if cpus > min(maximum, MAX_CPUS):
        raise UsageError(f"--cpus {cpus}: at most {min(maximum, MAX_CPUS)} vCPUs "
                         f"(KVM allows {maximum}, pyvmm's MP table {MAX_CPUS})")


def boot(args) -> int:
    from vmm.machine import ExitReason, Machine, MachineConfig
    from vmm.terminal import ConsoleInput, ConsoleOutput
    from vmm.vcpu import default_loop

    mem_size = _mem(args.mem)
    cpus = _cpus(args.cpus)
    markers = {}
    if args.kernel is None:
        if args.raw:
            raise UsageError("--raw needs a KERNEL (a bare-metal ELF)")
        from vmm import guestbuild
        kernel, initrd = guestbuild.default_guest()
        markers[guestbuild.READY_MARKER.encode()] = "ready"
    else:
        kernel = _check_file(args.kernel, "kernel")
        initrd = _check_file(args.initrd, "initrd") if args.initrd else None
    system_map = _check_file(args.system_map, "System.map") if args.system_map else None
    if args.raw and (args.initrd or args.cmdline or args.cmdline_replace):
        raise UsageError("--raw guests take no --initrd or kernel command line")
    disks = [_disk(spec) for spec in args.disk]
    if args.root and not disks:
        raise UsageError("--root needs a --disk")

    if cpus > 1:
        _check_cpus(cpus)

    linux = None
    if not args.raw:
        from vmm import linux as linuxboot
        root = f"root=/dev/vda {'ro' if disks[0].read_only else 'rw'}" if args.root else None
        linux = linuxboot.prepare(args.cpu_profile, cpus, root=root, extra=args.cmdline,
                                  replace=args.cmdline_replace)
    # Printed once the VM is built, so that a bad-input error stays one line.
    notes = list(linux.notes) if linux else []

    out = ConsoleOutput(log_path=args.console_log)
    status = EXIT_VMM_ERROR
    interrupted = {"machine": None}

    def on_sigterm(signo, frame):
        m = interrupted["machine"]
        if m is not None:
            m.stop()

    # --timeout covers the whole session, restarts included.
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            config = MachineConfig(
                kernel=kernel, mem_size=mem_size, cpus=cpus, kind="raw" if args.raw else "linux",
                initrd=initrd, cmdline=linux.cmdline if linux else "", kernel_mode=args.kernel_mode,
                loop=args.loop or default_loop(), console=out.write, markers=markers, disks=disks,
                system_map=system_map)
            if linux is not None:
                config.quirks = linux.quirks
            with Machine(config) as machine:
                interrupted["machine"] = machine
                if machine.kernel.fallback_reason:
                    notes.append("note: starting the kernel's own decompressor: "
                                 + machine.kernel.fallback_reason)
                for note in notes:
                    _err(out, note)
                notes.clear()

                def help_(text):
                    out.end_line()
                    os.write(2, text.encode())

                with ConsoleInput(machine.serial.enqueue_input, machine.serial.input_space,
                                  machine.stop, help_):
                    try:
                        result = machine.run(timeout=None if deadline is None
                                             else max(deadline - time.monotonic(), 0))
                    except KeyboardInterrupt:
                        machine.stop()
                        result = machine.run()
                times = dict(machine.times)
                if os.environ.get("PYVMM_BENCH_STAMPS"):
                    _write_stamps(os.environ["PYVMM_BENCH_STAMPS"], machine)
            interrupted["machine"] = None
            if result.reason is ExitReason.REBOOT and args.on_reboot == "restart":
                _err(out, "guest rebooted: restarting")
                continue
            break
        status = result.status
        if result.reason not in (ExitReason.POWEROFF, ExitReason.DEBUG_EXIT, ExitReason.REBOOT):
            _err(out, f"guest ended: {result.reason.value}" + (f": {result.detail}" if result.detail else ""))
        if args.timings:
            _print_timings(out, times)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        out.close()
    return status


def _write_stamps(path: str, machine) -> None:
    """For scripts/bench_*.py: phase times (CLOCK_MONOTONIC) and memory use, as JSON."""
    import json
    guest_kib = 0
    base = machine.mem_host_address
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line[0].isupper():
                inside = int(line.split("-")[0], 16) == base
            elif inside and line.startswith("Rss:"):
                guest_kib = int(line.split()[1])
    with open("/proc/self/status") as f:
        rss_kib = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    data = {"exec": T0, **machine.times, "rss_kib": rss_kib, "guest_rss_kib": guest_kib}
    with open(path, "w") as f:
        json.dump(data, f)


def mkfs(args) -> int:
    from vmm.images import make_ext4
    from vmm.memory import GuestMemoryError, parse_size
    try:
        size = parse_size(args.size) if args.size else None
    except GuestMemoryError as e:
        raise UsageError(f"--size: {e}") from None
    make_ext4(None if args.source == "-" else args.source, args.image, size)
    return 0


def _print_timings(out, times: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    out.end_line()
    table = Table(title="pyvmm boot timings", title_justify="left")
    table.add_column("phase")
    table.add_column("at (ms)", justify="right")
    table.add_column("took (ms)", justify="right")
    phases = [("exec (pyvmm start)", T0), ("VMM setup done, kernel entry", times.get("run")),
              ("first console byte", times.get("first-output")),
              ("userspace ready marker", times.get("ready")), ("VM exit", times.get("exit"))]
    prev = T0
    for name, t in phases:
        if t is None:
            table.add_row(name, "-", "-")
            continue
        table.add_row(name, f"{(t - T0) * 1000:.0f}", f"{(t - prev) * 1000:.0f}")
        prev = t
    Console(stderr=True).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "run":
            return runcli.run(args)
        if args.command == "mkfs":
            return mkfs(args)
        return boot(args)
    except UserError as e:
        _err(None, str(e))
        return EXIT_USAGE
    except HostError as e:
        _err(None, str(e))
        return EXIT_VMM_ERROR
    except OSError as e:
        _err(None, f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return EXIT_USAGE

if __name__ == "__main__":
    sys.exit(main())
