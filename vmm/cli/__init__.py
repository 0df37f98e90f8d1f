"""pyvmm's command line: parse, build, run, map errors to exit codes. Kept thin.

One module per subcommand (``vmm/cli/boot.py``, ...), each with ``add_parser(subparsers)``
and ``main(args) -> int``; what they share (the parser class, the size/disk/CPU parsers,
the option groups) is in ``vmm/cli/common.py``. Adding a subcommand is a new module and
its name in COMMANDS.

Exit status: the subcommand's (see its module), or for an error it lets out
  1  VMM error (HostError: KVM unavailable, a failed guest build)
  2  bad usage or input (UserError, OSError), one line on stderr

Start-up counts (``pyvmm boot --raw`` reaches KVM_RUN in ~45 ms): the subcommand modules
import only vmm.cli.common at module level, and their heavy dependencies in main().
"""

from __future__ import annotations

from vmm.cli import common  # first: it takes the start-up time stamp, common.T0

#: The subcommands, in --help order: each the name of a module in this package.
COMMANDS = ("boot", "restore", "run", "mkfs", "cache", "pull", "images", "rmi", "push", "build")


def _commands(names=COMMANDS) -> dict:
    # __import__ rather than importlib.import_module: -X importtime then shows each one.
    return {name: __import__(f"vmm.cli.{name}", fromlist=["main"]) for name in names}


def parser(commands: dict | None = None):
    """The ``pyvmm`` argument parser, with every subcommand in ``commands``."""
    from vmm import __version__
    p = common._Parser(prog="pyvmm",
                       description="A hackable virtual machine monitor on Linux KVM.")
    p.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=common._Parser)
    for module in (commands or _commands()).values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """``pyvmm ...``: returns the exit status."""
    import sys

    from vmm.errors import HostError, UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    # Start-up: `pyvmm boot ...` imports and adds only boot (~1 ms); --help etc. all.
    commands = _commands(argv[:1] if argv[:1] and argv[0] in COMMANDS else COMMANDS)
    p = parser(commands)
    args = p.parse_args(argv)
    if args.command is None:    # a short usage and one line, as for any usage error
        print(f"usage: pyvmm [--version] {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        common.err("no command given (see pyvmm --help)")
        return common.EXIT_USAGE
    try:
        if args.command in ("boot", "restore", "run"):
            from vmm.privileges import harden
            harden()    # no_new_privs, RLIMIT_NOFILE: before any guest code runs
        return commands[args.command].main(args)
    except UserError as e:
        common.err(str(e))
        return common.EXIT_USAGE
    except HostError as e:
        common.err(str(e))
        return common.EXIT_VMM_ERROR
    except OSError as e:
        common.err(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        return common.EXIT_USAGE
