"""What the subcommands share: the parser class, the value parsers and the option groups.

Each option that more than one subcommand takes is defined here once, in a group
function (``add_machine_options``, ``add_output_options``, ``add_verbose``); a
subcommand passes only the help text that really differs. ``Notes`` decides when
pyvmm's own notes reach stderr.

Only argparse, os, sys and time are imported at module level (``pyvmm boot`` must reach
KVM_RUN within its start-up budget); the value parsers import what they need when
called. This module imports no other vmm.cli module.
"""

from __future__ import annotations

import time

#: When pyvmm started (CLOCK_MONOTONIC): the first thing vmm.cli does is import this
#: module, so this is as close to exec as Python code gets (``--timings``, bench stamps).
T0 = time.monotonic()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from vmm.errors import UserError  # noqa: E402

EXIT_VMM_ERROR = 1
EXIT_USAGE = 2


class UsageError(UserError):
    """Bad input from the user: printed as one line, exit status 2."""


# argparse translates its own fragments ("usage: ", "error: ", ...) through gettext,
# whose every lookup imports locale and probes the file system for catalogues (~3 ms
# per start). pyvmm's help and errors are English throughout; a translated fragment in
# them would only mix languages. So argparse's fragments are used as written.
argparse._ = lambda message: message
argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with the width taken from ``os``: the stock one imports
    shutil (and with it bz2, lzma, ...) for every one of the ~50 formatters argparse
    makes while options are added, ~4 ms of every start."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2 (argparse prints usage + error otherwise)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def err(message: str, console=None) -> None:
    """Print ``pyvmm: MESSAGE`` on stderr (first ending the console's partial line)."""
    if console is not None:
        console.end_line()
    print(f"pyvmm: {message}", file=sys.stderr, flush=True)


# -- option groups: each shared option is defined here and nowhere else ----------------

DISK_METAVAR = "PATH[,ro][,snapshot][,serial=ID][,cache=MODE]"


def add_machine_options(p: argparse.ArgumentParser) -> None:
    """--mem, --disk, --cmdline, --cpu-profile, --loop, --net, --publish: what the VM
    is made of."""
    p.add_argument("--mem", default="256M",
                   help="guest RAM, e.g. 512M, 1G, 256 (MiB); default 256M")
    p.add_argument("--disk", action="append", default=[], metavar=DISK_METAVAR,
                   help="a virtio-blk disk (repeatable; /dev/vda, /dev/vdb, ... in order); "
                        "snapshot: the guest may write, but PATH is never modified (writes "
                        "go to a temporary overlay, discarded when the VM ends); "
                        "cache is writeback (default), none or unsafe (flushes ignored)")
    p.add_argument("--cmdline", default="",
                   help="arguments appended to the default kernel command line")
    p.add_argument("--cpu-profile", choices=("auto", "host", "safe"), default="auto",
                   help="host: nothing hidden; safe: work around an emulation-only KVM; "
                        "auto: detect (default)")
    add_loop_option(p)
    add_net_options(p)


def add_net_options(p: argparse.ArgumentParser) -> None:
    """--net, --publish: the guest's network card (vmm.net); read by parse_net_options."""
    p.add_argument("--net", default="none", metavar="none|user|tap=NAME",
                   help="a virtio-net card: user (no root: NAT, DNS and the host's loopback "
                        "through passt), tap=NAME (a TAP device; root or CAP_NET_ADMIN), "
                        "none (default)")
    p.add_argument("--publish", "-p", action="append", default=[],
                   metavar="[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]",
                   help="forward a host port to the guest (--net user; repeatable)")


def add_loop_option(p: argparse.ArgumentParser) -> None:
    """--loop (also on its own: a restored VM chooses only how it runs)."""
    p.add_argument("--loop", choices=("shim", "python"), default=None,
                   help="vCPU run loop: the C shim (default) or the pure-Python twin")


def add_output_options(p: argparse.ArgumentParser, *, timings_help: str,
                       timeout_help: str) -> None:
    """--console-log, --timings, --timeout (their meaning differs a little per command)."""
    p.add_argument("--console-log", metavar="FILE",
                   help="append the guest's console output to FILE (a regular file or a "
                        "character device; FIFOs and sockets are refused)")
    p.add_argument("--timings", action="store_true", help=timings_help)
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help=timeout_help)


def add_verbose(p: argparse.ArgumentParser) -> None:
    """--verbose / -v (or PYVMM_VERBOSE=1): show pyvmm's own notes as they arise."""
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print pyvmm's own notes (host detection, CPU profile) on stderr; "
                        "without it they are printed only if something fails "
                        "(PYVMM_VERBOSE=1 does the same)")


def add_snapshot_cache_option(p: argparse.ArgumentParser, what: str) -> None:
    """--no-snapshot-cache (``pyvmm run``, ``pyvmm boot``: vmm/snapshot/cache.py)."""
    p.add_argument("--no-snapshot-cache", action="store_true",
                   help=f"boot {what} even if a snapshot of a booted one is cached, and "
                        "save none (the cache: pyvmm cache list)")


def add_user_option(p: argparse.ArgumentParser) -> None:
    """--user UID[:GID] (boot, run, restore): drop root once /dev/kvm and images are open."""
    p.add_argument("--user", type=user_ids, metavar="UID[:GID]",
                   help="when started as root: run the VM as this user (number or name; "
                        "GID defaults to the user's group) once /dev/kvm, the kernel and "
                        "the disks are open (docs/security.md)")


def user_ids(text: str) -> tuple[int, int]:
    """``--user`` text -> (uid, gid); an argparse ``type`` (errors: one line, exit 2)."""
    from vmm.privileges import check_can_drop, parse_user
    try:
        ids = parse_user(text)
        check_can_drop()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ids


def drop_privileges(args) -> None:
    """If --user was given: become that user now (vmm.privileges.drop_to)."""
    ids = getattr(args, "user", None)
    if ids is not None:
        from vmm.privileges import drop_to
        drop_to(*ids)


def verbose(args) -> bool:
    """Whether --verbose was given or PYVMM_VERBOSE is set (to anything but '' or 0)."""
    return bool(getattr(args, "verbose", False)) or \
        os.environ.get("PYVMM_VERBOSE", "") not in ("", "0")


class Notes:
    """pyvmm's own notes (the host-detection note, the AVX note, ...) and when to print them.

    With ``verbose`` a note is written as soon as it is added. Without, it is held, and
    written only by ``failed()``: when the command then fails the notes explain the
    host, and when it succeeds stderr holds only what the guest (or CMD) wrote there.
    A note added again (a VM restarted, a retry) is ignored: each is said once.

    Args:
        verbose: write each note at once.
        write: called with each note to print (default: ``pyvmm: NOTE`` on stderr).
    """

    def __init__(self, verbose: bool, write=None):
        self.verbose = verbose
        self._write = write if write is not None else err
        self.held: list[str] = []
        self._seen: set[str] = set()

    def add(self, *notes: str) -> None:
        for note in notes:
            if note in self._seen:
                continue
            self._seen.add(note)
            if self.verbose:
                self._write(note)
            else:
                self.held.append(note)

    def failed(self) -> None:
        """Something failed: write the notes held until now (each once)."""
        held, self.held = self.held, []
        for note in held:
            self._write(note)


# -- value parsers --------------------------------------------------------------------

def seconds(text: str) -> float:
    """A timeout option's text -> a finite, positive number of seconds.

    ``float()`` alone takes ``inf``, ``nan`` and ``1e309`` (= inf), which either
    overflow the waits below (a traceback) or compare false with everything (``nan``:
    no timeout at all), and ``-1`` (a VM stopped before it starts). As an argparse
    ``type``: its ArgumentTypeError becomes the parser's one-line error (exit 2).
    """
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    # threading's waits take at most threading.TIMEOUT_MAX (~292 years) as a float.
    if not math.isfinite(value) or value <= 0 or value > 1e9:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a positive, finite number of seconds (at most 1e9)")
    return value


def check_file(path: str, what: str) -> Path:
    """``path`` as a Path if it is a readable file; else a UsageError naming ``what``."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path}: no such file")
    if p.is_dir():
        raise UsageError(f"{what} {path}: is a directory")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{what} {path}: permission denied")
    return p


def parse_cpus(text: str) -> int:
    """``--cpus`` text -> a count of at least 1 (the KVM maximum is checked at boot)."""
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--cpus must be a whole number, not {text!r}") from None
    if n < 1:
        raise UsageError(f"--cpus must be at least 1, not {n}")
    return n


def parse_mem(text: str) -> int:
    """``--mem`` text (512M, 1G, 256 MiB) -> bytes, within pyvmm's and this host's limits."""
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


def _printable(text: str) -> str:
    """``text`` as it can be printed (bytes that are not UTF-8 shown as escapes)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_net_options(args):
    """--net and --publish -> a vmm.config.NetConfig, or None (no NIC)."""
    net, publish = getattr(args, "net", "none"), getattr(args, "publish", ())
    if net == "none" and not publish:
        return None  # the usual case: vmm.net (socket, ...) stays off the boot path
    from vmm.net import NetError, parse_net
    try:
        return parse_net(net, publish)
    except NetError as e:
        raise UsageError(str(e)) from None


def parse_disk(spec: str):
    """``PATH[,ro][,snapshot][,serial=ID][,cache=writeback|none|unsafe]`` -> DiskConfig."""
    from vmm.config import DiskConfig
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
            # virtio 1.2 §5.2.6 (VIRTIO_BLK_T_GET_ID): 20 bytes; vmm.devices.virtio.blk
            # takes ASCII. (Command-line bytes that are not UTF-8 arrive as surrogates.)
            if not value.isascii() or len(value) > 20:
                raise UsageError(f"--disk {_printable(spec)}: serial is at most 20 ASCII "
                                 "characters")
            disk.serial = value
        elif key == "cache" and value in ("writeback", "none", "unsafe"):
            disk.cache = value
        else:
            raise UsageError(f"--disk {spec}: unknown option {opt!r} "
                             "(use ro, snapshot, serial=ID, cache=writeback|none|unsafe)")
    check_file(path, "disk")
    return disk
