"""``pyvmm cache list|clear``: the snapshots disposable guests start from.

``list`` shows each cached "agent ready" snapshot (vmm.snapshot.cache): its key, size
on disk, when it was last used; ``clear`` removes them all (a guest running from one
keeps its memory mapping until it ends).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``cache`` command to ``pyvmm``'s subparsers."""
    c = subparsers.add_parser("cache", help="list or clear the snapshots disposable guests "
                                            "start from")
    c.add_argument("action", choices=("list", "clear"), help="list or clear")


def main(args) -> int:
    import sys
    import time

    from vmm.snapshot import cache

    if args.action == "clear":
        n = cache.clear()
        print(f"pyvmm: removed {n} cached snapshot{'' if n == 1 else 's'}", file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.table import Table

    entries = cache.entries()
    table = Table(title=f"pyvmm snapshot cache: {cache.root()}", title_justify="left")
    table.add_column("key")
    table.add_column("size (MiB)", justify="right")
    table.add_column("last used")
    for e in entries:
        table.add_row(e["key"], f"{e['bytes'] / (1 << 20):.1f}",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["used"])))
    total = sum(e["bytes"] for e in entries)
    Console().print(table)
    print(f"{len(entries)} snapshot{'' if len(entries) == 1 else 's'}, "
          f"{total / (1 << 20):.1f} MiB of {cache.max_bytes() / (1 << 20):.0f} MiB allowed "
          "($PYVMM_SNAPSHOT_CACHE_MAX)")
    return 0
