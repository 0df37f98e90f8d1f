"""``pyvmm restore DIR``: resume a VM saved by ``pyvmm boot`` (Ctrl-A s, --snapshot-on).

The same console, exit statuses and --timings as ``pyvmm boot``: the guest's status
(0 after a power-off), else 1 VMM error, 2 bad usage or a snapshot that cannot be
restored here (missing, truncated, corrupted, from another pyvmm or host: one line,
nothing started), 3 panic, 4 triple fault, 5 emulation failure, 130 stopped.
"""

from __future__ import annotations

from vmm.cli.common import add_loop_option, add_output_options, add_user_option, add_verbose


def add_parser(subparsers) -> None:
    """Add the ``restore`` command to ``pyvmm``'s subparsers."""
    from vmm.cli.boot import add_snapshot_options
    r = subparsers.add_parser("restore", help="resume a VM from a snapshot directory")
    r.add_argument("directory", metavar="DIR", help="a snapshot directory")
    add_loop_option(r)
    add_output_options(r, timings_help="print a table of restore phases at exit",
                       timeout_help="stop the VM after this long")
    add_snapshot_options(r)
    add_user_option(r)
    add_verbose(r)


def main(args) -> int:
    """Run ``pyvmm restore``; returns the exit status."""
    from vmm.cli.boot import check_snapshot_dir, session
    from vmm.machine import Machine
    from vmm.snapshot import persist
    from vmm.vcpu import default_loop

    check_snapshot_dir(args)
    snap, config = persist.load(args.directory, loop=args.loop or default_loop())

    def new_machine(console):
        config.console = console
        return Machine(config, snapshot=snap)

    return session(args, new_machine)
