"""``pyvmm boot [KERNEL]``: boot a kernel (default: the project's own Linux guest).

Exit status: the guest's (0 after a power-off; a test guest's debug-exit byte), or
  1  VMM error (KVM unavailable, a bug)        3  guest kernel panic
  2  bad usage or input (one line on stderr)    4  guest triple fault
  5  an instruction KVM could not emulate       130  stopped (Ctrl-A x, SIGTERM, timeout)

pyvmm's own notes (the host detection, the decompressor fallback) are printed with
--verbose, or when the VM ends in a way other than a power-off, reboot, debug-exit or
a stop that was asked for.
"""

from __future__ import annotations

import os

from vmm.cli.common import (T0, EXIT_VMM_ERROR, Notes, UsageError, add_machine_options,
                            add_output_options, add_snapshot_cache_option, add_user_option,
                            add_verbose, check_file, drop_privileges, err, parse_cpus,
                            parse_disk, parse_mem, parse_net_options, verbose)


def add_parser(subparsers) -> None:
    """Add the ``boot`` command to ``pyvmm``'s subparsers."""
    b = subparsers.add_parser("boot", help="boot a kernel (default: the project's own Linux guest)")
    b.add_argument("kernel", nargs="?",
                   help="bzImage or ELF vmlinux (or, with --raw, a bare-metal ELF)")
    b.add_argument("--cpus", default="1", help="number of vCPUs (default 1)")
    b.add_argument("--raw", action="store_true",
                   help="KERNEL is a bare-metal ELF test guest: start it in long mode, "
                        "no boot protocol")
    b.add_argument("--initrd", help="initramfs / initrd image")
    b.add_argument("--cmdline-replace", metavar="CMDLINE",
                   help="use exactly this kernel command line")
    b.add_argument("--kernel-mode", choices=("auto", "elf", "bzimage"), default="auto",
                   help="bzImage loading: decompress on the host (elf), the kernel's own "
                        "decompressor (bzimage), or elf when possible (auto, default)")
    b.add_argument("--on-reboot", choices=("exit", "restart"), default="exit",
                   help="what a guest reboot does (default: exit)")
    b.add_argument("--system-map", metavar="FILE",
                   help="System.map naming kernel functions in crash diagnostics")
    b.add_argument("--root", action="store_true",
                   help="mount the first --disk as the root filesystem (root=/dev/vda)")
    b.add_argument("--image", metavar="REF",
                   help="a shell in this container image (from the store, pulled if absent), "
                        "on a copy-on-write root (default guest only)")
    add_machine_options(b)
    add_output_options(b, timings_help="print a table of boot phases at exit",
                       timeout_help="stop the VM after this long")
    add_snapshot_options(b)
    add_snapshot_cache_option(b, "the default guest")
    add_user_option(b)
    add_verbose(b)


def _check_cpus(cpus: int) -> None:
    from vmm.arch.x86_64.mptable import MAX_CPUS
    from vmm.kvm import Kvm
    with Kvm() as kvm:
        _, maximum = kvm.max_vcpus()
    if cpus > min(maximum, MAX_CPUS):
        raise UsageError(f"--cpus {cpus}: at most {min(maximum, MAX_CPUS)} vCPUs "
                         f"(KVM allows {maximum}, pyvmm's MP table {MAX_CPUS})")


def main(args) -> int:
    """Run ``pyvmm boot``; returns the exit status (UserError etc. go to vmm.cli.main)."""

    from vmm.machine import Machine, MachineConfig
    from vmm.vcpu import default_loop

    mem_size = parse_mem(args.mem)
    cpus = parse_cpus(args.cpus)
    check_snapshot_dir(args)
    markers = {}
    if args.kernel is None:
        if args.raw:
            raise UsageError("--raw needs a KERNEL (a bare-metal ELF)")
        from vmm import defaultguest
        from pathlib import Path
        kernel, initrd = (Path(p) for p in defaultguest.default_guest())
        markers[defaultguest.READY_MARKER.encode()] = "ready"
    else:
        kernel = check_file(args.kernel, "kernel")
        initrd = check_file(args.initrd, "initrd") if args.initrd else None
    system_map = check_file(args.system_map, "System.map") if args.system_map else None
    if args.raw and (args.initrd or args.cmdline or args.cmdline_replace):
        raise UsageError("--raw guests take no --initrd or kernel command line")
    disks = [parse_disk(spec) for spec in args.disk]
    if args.root and not disks:
        raise UsageError("--root needs a --disk")
    net = parse_net_options(args)
    image_param = ""
    if args.image:              # guests/initramfs/init: chroot into /dev/vda, its /bin/sh
        if args.kernel is not None or args.root or args.raw:
            raise UsageError("--image boots the default guest: no KERNEL, --raw or --root")
        from vmm.config import DiskConfig
        from vmm.image.run import find_image
        disks.insert(0, DiskConfig(find_image(args.image).rootfs, snapshot=True))
        image_param = f"{defaultguest.ROOTFS_PARAM}=/dev/vda"

    if cpus > 1:
        _check_cpus(cpus)

    # The default guest's "shell ready" snapshot (vmm/cli/shellsnap.py).
    shell_snapshot = (args.kernel is None and not disks and not args.snapshot_on
                      and not args.cmdline_replace and not args.no_snapshot_cache
                      and args.on_reboot == "exit" and net is None
                      and _snapshot_cache_enabled())
    linux = None
    if not args.raw:
        from vmm import linux as linuxboot
        root = f"root=/dev/vda {'ro' if disks[0].read_only else 'rw'}" if args.root else None
        extra = " ".join(x for x in (image_param, args.cmdline) if x)
        if shell_snapshot:
            from vmm.guestdefs import SHELL_AGENT_PARAM
            extra = " ".join(x for x in (SHELL_AGENT_PARAM, extra) if x)
        linux = linuxboot.prepare(args.cpu_profile, cpus, root=root, extra=extra,
                                  replace=args.cmdline_replace)
    shell = None
    if shell_snapshot:
        from vmm.cli.shellsnap import ShellSnapshot, shell_key
        key = shell_key(kernel=kernel, initrd=initrd, mem_size=mem_size, cpus=cpus,
                        cmdline=linux.cmdline, quirks=linux.quirks)
        shell = ShellSnapshot(key) if key is not None else None

    def new_machine(console):
        config = MachineConfig(
            kernel=kernel, mem_size=mem_size, cpus=cpus, kind="raw" if args.raw else "linux",
            initrd=initrd, cmdline=linux.cmdline if linux else "", kernel_mode=args.kernel_mode,
            loop=args.loop or default_loop(), console=console, markers=markers, disks=disks,
            system_map=system_map, cpu_profile=linux.profile if linux else "", net=net)
        if linux is not None:
            config.quirks = linux.quirks
        return shell.build(config) if shell is not None else Machine(config)

    return session(args, new_machine, pre_notes=linux.notes if linux else (),
                   restartable=args.on_reboot == "restart", companion=shell)


def _snapshot_cache_enabled() -> bool:
    from vmm.snapshot import cache
    return cache.enabled()


def add_snapshot_options(p) -> None:
    """--snapshot-dir and --snapshot-on (boot and restore)."""
    p.add_argument("--snapshot-dir", metavar="DIR",
                   help="where Ctrl-A s (or --snapshot-on) saves the snapshot "
                        "(default: ./pyvmm-snapshot-<time>)")
    p.add_argument("--snapshot-on", metavar="MARKER",
                   help="save a snapshot to --snapshot-dir when a console line starts with "
                        "MARKER, then end (exit status 0)")


def check_snapshot_dir(args) -> None:
    """--snapshot-dir must be free (absent or an empty directory): said before booting."""
    d = getattr(args, "snapshot_dir", None)
    if d and os.path.lexists(d) and (not os.path.isdir(d) or os.listdir(d)):
        raise UsageError(f"--snapshot-dir {d}: already exists; remove it or choose another")
    if d and not os.path.isdir(os.path.dirname(os.path.abspath(d))):
        raise UsageError(f"--snapshot-dir {d}: {os.path.dirname(os.path.abspath(d))} "
                         "is not a directory")


def session(args, new_machine, *, pre_notes=(), restartable: bool = False,
            companion=None) -> int:
    """Run a VM on the terminal to its end: console in and out, SIGTERM, --timeout
    (over the whole session, restarts included), --timings, snapshots (Ctrl-A s,
    --snapshot-on) and pyvmm's notes. Shared by ``pyvmm boot`` and ``pyvmm restore``.

    Args:
        new_machine: ``new_machine(console) -> Machine`` (console: the output callable).
        pre_notes: notes known before the VM is built (host detection).
        restartable: a guest reboot builds a new VM (``--on-reboot restart``).
        companion: what works beside the VM (vmm/cli/shellsnap.py's ShellSnapshot):
            its ``notes`` is set to a callable adding notes before a VM is built, and
            its ``join()`` is called before the VM is closed.
    """
    import signal
    import threading
    import time

    from vmm.errors import UserError
    from vmm.machine import ExitReason
    from vmm.terminal import ConsoleInput, ConsoleOutput

    out = ConsoleOutput(log_path=args.console_log)
    # Added once the VM is built, so that a bad-input error stays one line.
    notes = Notes(verbose(args), lambda note: err(note, out))
    if companion is not None:
        companion.notes = notes.add
    status = EXIT_VMM_ERROR
    # "term": a SIGTERM has come; one that arrives while a VM is being built (no
    # machine to stop yet) stops it as soon as it exists, and ends the session.
    interrupted = {"machine": None, "term": False}
    snapshot_on = getattr(args, "snapshot_on", None)

    def on_sigterm(signo, frame):
        interrupted["term"] = True
        m = interrupted["machine"]
        if m is not None:
            m.stop()

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            with new_machine(out.write) as machine:
                interrupted["machine"] = machine
                drop_privileges(args)   # --user: /dev/kvm and images are open now
                if interrupted["term"]:     # came while new_machine() ran
                    machine.stop()
                notes.add(*pre_notes, *machine.notes)
                kernel = getattr(machine, "kernel", None)
                if kernel is not None and kernel.fallback_reason:
                    notes.add("note: starting the kernel's own decompressor: "
                              + kernel.fallback_reason)
                snapshots = _Snapshots(machine, args, out)
                if snapshot_on:
                    machine.watch_console(snapshot_on.encode(), snapshots.save_and_end)

                def help_(text):
                    out.end_line()
                    os.write(2, text.encode())

                with ConsoleInput(machine.serial.enqueue_input, machine.serial.input_space,
                                  machine.stop, help_, on_snapshot=snapshots.save_and_resume):
                    try:
                        result = machine.run(timeout=None if deadline is None
                                             else max(deadline - time.monotonic(), 0))
                    except KeyboardInterrupt:
                        machine.stop()
                        result = machine.run()
                snapshots.join()
                if companion is not None:
                    companion.join()
                times = dict(machine.times)
                if os.environ.get("PYVMM_BENCH_STAMPS"):
                    _write_stamps(os.environ["PYVMM_BENCH_STAMPS"], machine)
            interrupted["machine"] = None
            if result.reason is ExitReason.REBOOT and restartable and not interrupted["term"]:
                err("guest rebooted: restarting", out)
                continue
            break
        status = result.status
        if result.reason not in (ExitReason.POWEROFF, ExitReason.DEBUG_EXIT, ExitReason.REBOOT,
                                 ExitReason.SNAPSHOTTED):
            if result.reason is not ExitReason.STOPPED:
                notes.failed()
            err(f"guest ended: {result.reason.value}"
                + (f": {result.detail}" if result.detail else ""), out)
        if args.timings:
            _print_timings(out, times)
    except (UserError, KeyboardInterrupt):
        raise
    except BaseException:       # a VMM error or a bug: the notes may explain it
        notes.add(*pre_notes)   # if it failed before the VM was built
        notes.failed()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        out.close()
    return status


class _Snapshots:
    """Ctrl-A s and --snapshot-on: save on a thread of its own (the request comes from
    the console-input, console or vCPU thread, none of which may wait for the pause)."""

    def __init__(self, machine, args, out):
        self.machine, self.args, self.out = machine, args, out
        self.threads = []
        self.count = 0

    def _directory(self) -> str:
        import time
        given = getattr(self.args, "snapshot_dir", None)
        if given and self.count == 0:
            return given
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = given or f"pyvmm-snapshot-{stamp}"
        return base if self.count == 0 else f"{base}.{self.count}"

    def _save(self, end: bool) -> None:
        from vmm.errors import UserError
        directory = self._directory()
        self.count += 1
        try:
            info = self.machine.snapshot(directory, end=end)
        except UserError as e:
            err(f"snapshot failed: {e}", self.out)
            if end:
                self.machine.fail(e)
            return
        except BaseException as e:  # noqa: BLE001 - a bug: say it, end the VM
            err(f"snapshot failed: {type(e).__name__}: {e}", self.out)
            self.machine.fail(e)
            return
        err(f"snapshot saved to {directory} ({info.memory_stored / (1 << 20):.1f} MiB of "
            f"memory, {info.total_s * 1000:.0f} ms)", self.out)

    def _start(self, end: bool) -> None:
        import threading
        t = threading.Thread(target=self._save, args=(end,), name="snapshot", daemon=True)
        self.threads.append(t)
        t.start()

    def save_and_resume(self) -> None:
        self._start(False)

    def save_and_end(self) -> None:
        self._start(True)

    def join(self) -> None:
        for t in self.threads:
            t.join()


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
