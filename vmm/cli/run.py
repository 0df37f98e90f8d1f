"""``pyvmm run [OPTIONS] -- CMD [ARGS...]``: run one command in a disposable guest.

Boots a guest (the default one unless --kernel/--initrd), runs CMD as its only job,
streams CMD's stdout and stderr to ours (kernel messages stay apart: --console shows
them on stderr), copies files out, tears the VM down and exits with CMD's status. When
all goes well stderr holds only CMD's stderr (as with ``podman run``): pyvmm's own
notes are printed with --verbose, and whenever pyvmm or the guest fails.

Exit status: CMD's own (128 + N if a signal N killed it), else
  2    bad usage or input (one line on stderr)
  124  --timeout passed: the guest was stopped (as timeout(1))
  125  pyvmm or the guest failed (boot failure, guest crash, copy-out failure);
       the message and the console tail go to stderr
  130  interrupted (SIGINT, SIGTERM)
"""

from __future__ import annotations

import argparse

from vmm.cli.common import (EXIT_USAGE, Notes, UsageError, add_machine_options,
                            add_output_options, add_snapshot_cache_option, add_user_option,
                            add_verbose, drop_privileges, err, parse_disk, parse_mem,
                            parse_net_options, seconds, verbose)

EXIT_TIMEOUT = 124
EXIT_FAILED = 125
EXIT_INTERRUPTED = 130


def add_parser(subparsers) -> None:
    """Add the ``run`` command to ``pyvmm``'s subparsers."""
    r = subparsers.add_parser(
        "run", help="run one command in a disposable guest and exit with its status",
        usage="pyvmm run [OPTIONS] -- CMD [ARGS...]",
        description="Boot a guest, run CMD in it (stdout/stderr streamed, stdin empty), "
                    "copy files out, tear it down and exit with CMD's exit status "
                    "(124: --timeout passed; 125: the VM or guest failed).")
    r.add_argument("--kernel", help="ELF vmlinux or bzImage (default: the project's guest)")
    r.add_argument("--initrd", help="initramfs with /init and /bin/pyvmm-agent "
                                    "(default: the project's)")
    r.add_argument("--rootfs", metavar="IMG",
                   help="run CMD chrooted in this root filesystem image, on a throwaway "
                        "copy-on-write overlay (the image is never modified)")
    r.add_argument("--image", metavar="REF",
                   help="run in this container image, like podman run --rm: its "
                        "Entrypoint + Cmd (CMD replaces Cmd), Env, WorkingDir and User, on "
                        "a copy-on-write root (pulled into the store if absent)")
    r.add_argument("--boot-timeout", type=seconds, default=600.0, metavar="SECONDS",
                   help="give up if the guest is not ready after this long (default 600)")
    r.add_argument("--env", "-e", action="append", default=[], metavar="KEY=VALUE",
                   help="set an environment variable for CMD (repeatable)")
    r.add_argument("--workdir", "-w", metavar="DIR", help="directory to run CMD in (default /)")
    r.add_argument("--copy-in", action="append", default=[], metavar="HOSTDIR:GUESTPATH",
                   help="make a host directory available read-only at GUESTPATH (repeatable)")
    r.add_argument("--copy-out", action="append", default=[], metavar="GUESTPATH:HOSTPATH",
                   help="after CMD ends, copy GUESTPATH (file or tree) to HOSTPATH (repeatable; "
                        "each copy is bounded by --timeout, else --boot-timeout)")
    r.add_argument("--scratch-size", default="256M", metavar="SIZE",
                   help="size of the scratch disk --copy-out copies through (default 256M)")
    add_snapshot_cache_option(r, "the guest")
    r.add_argument("--console", action="store_true",
                   help="show the guest's console (kernel messages) on stderr")
    add_machine_options(r)
    add_output_options(r, timings_help="print boot / command / teardown times on stderr "
                                       "at the end",
                       timeout_help="stop the guest if CMD runs longer (exit status 124)")
    add_user_option(r)
    add_verbose(r)
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the command and its arguments, exec'd as given (no shell)")


def _write_fd(fd: int, data: bytes) -> None:
    import os
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


def main(args) -> int:
    """Run ``pyvmm run``; returns the exit status (never raises for user errors)."""
    import os
    import signal
    import time

    from vmm.errors import HostError, UserError
    from vmm.guest import Guest, GuestError, GuestTimeout, parse_copy_spec

    t0 = time.monotonic()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        if not cmd and not args.image:
            raise UsageError("run: no command given (pyvmm run [OPTIONS] -- CMD [ARGS...])")
        if args.image and args.rootfs:
            raise UsageError("--image and --rootfs: give one root filesystem")
        parse_mem(args.mem)
        disks = [parse_disk(spec) for spec in args.disk]
        net = parse_net_options(args)
        env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--env {item!r}: expected KEY=VALUE")
            env[key] = value
        copy_in, copy_out = [], []
        for spec in args.copy_in:
            host, guest = parse_copy_spec(spec, "--copy-in")
            if not os.path.isdir(host):
                raise UsageError(f"--copy-in {spec}: {host} is not a directory")
            if not guest.startswith("/"):
                raise UsageError(f"--copy-in {spec}: the guest path must be absolute")
            copy_in.append((host, guest))
        for spec in args.copy_out:
            guest, host = parse_copy_spec(spec, "--copy-out")
            parent = os.path.dirname(os.path.abspath(host))
            if not os.path.isdir(parent):
                raise UsageError(f"--copy-out {spec}: {parent} is not a directory")
            if os.path.lexists(host) and not os.path.isdir(host):
                raise UsageError(f"--copy-out {spec}: {host} already exists")
            copy_out.append((guest, host))
        for path, what in ((args.kernel, "--kernel"), (args.initrd, "--initrd"),
                           (args.rootfs, "--rootfs")):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"{what} {path}: no such file")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if args.image:          # vmm/image/run.py: what podman run --rm would run
            from vmm.image.run import find_image, run_spec
            spec = run_spec(find_image(args.image), cmd, env, args.workdir)
            cmd, env, args.workdir, args.rootfs = spec.argv, spec.env, spec.workdir, spec.rootfs
    except (UserError, ValueError) as e:
        err(str(e))
        return EXIT_USAGE

    from vmm.hostfiles import ConsoleLog
    log = ConsoleLog(args.console_log, err) if args.console_log else None

    def console(data: bytes) -> None:
        if args.console:
            _write_fd(2, data)
        if log is not None:
            log.write(data)

    def on_term(signo, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    guest = Guest(kernel=args.kernel, initrd=args.initrd, mem=args.mem, disks=disks,
                  snapshot_cache=not args.no_snapshot_cache,
                  copy_in=copy_in, scratch_size=args.scratch_size if copy_out else None,
                  cmdline=args.cmdline, cpu_profile=args.cpu_profile, loop=args.loop,
                  net=net,
                  boot_timeout=args.boot_timeout, rootfs=args.rootfs,
                  console=console if (args.console or log) else None)
    notes = Notes(verbose(args))
    status = EXIT_FAILED
    times = {}

    noted = []

    def take_notes() -> None:       # guest.notes is filled while the guest starts
        if not noted:
            noted.append(True)
            notes.add(*guest.notes)

    def failed(message: str) -> None:
        take_notes()
        notes.failed()
        err(message)

    try:
        try:
            # --user: Guest opens /dev/kvm and the images in start(), so the user
            # needs access to them (a group or an ACL on /dev/kvm; docs/security.md).
            drop_privileges(args)
            guest.start()
            times["ready"] = time.monotonic()
            take_notes()
            result = guest.run(cmd, timeout=args.timeout, env=env, workdir=args.workdir,
                               stdout=lambda d: _write_fd(1, d), stderr=lambda d: _write_fd(2, d))
            times["command"] = time.monotonic()
            status = result.exit_code
            for guest_path, host_path in copy_out:   # bounded too: --timeout, else
                guest.copy_out(guest_path, host_path,  # --boot-timeout (Guest.copy_out)
                               timeout=args.timeout)
            times["copy-out"] = time.monotonic()
        except GuestTimeout as e:
            failed(str(e))
            status = EXIT_TIMEOUT
        except GuestError as e:
            failed(str(e))
            tail = e.console_tail or guest.console_tail()
            if tail and not args.console:
                err("guest console (tail):")
                _write_fd(2, tail[-3000:] + (b"" if tail.endswith(b"\n") else b"\n"))
            status = EXIT_FAILED
        except KeyboardInterrupt:
            err("interrupted: stopping the guest")
            status = EXIT_INTERRUPTED
        except UserError as e:
            err(str(e))
            status = EXIT_USAGE
        except (HostError, OSError, ValueError) as e:
            failed(str(e))
            status = EXIT_FAILED
    finally:
        guest.close()
        signal.signal(signal.SIGTERM, old_term)
        if log is not None:
            log.close()
    if args.timings:
        _print_timings(t0, guest.times, times)
    return status


def _print_timings(t0: float, gtimes: dict, times: dict) -> None:
    import sys
    phases = [("boot to agent ready", gtimes.get("start", t0), times.get("ready")),
              ("command", times.get("ready"), times.get("command")),
              ("copy-out", times.get("command"), times.get("copy-out")),
              ("teardown", times.get("copy-out") or times.get("command"), gtimes.get("closed"))]
    for name, a, b in phases:
        if a is not None and b is not None:
            print(f"pyvmm: timing: {name}: {(b - a) * 1000:.0f} ms", file=sys.stderr)
