"""``pyvmm images``: the images in the local store, as a table (name, digest, size, created)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``images`` command to ``pyvmm``'s subparsers."""
    p = subparsers.add_parser("images", help="list the images in the local store")
    p.add_argument("--digests", action="store_true", help="show full digests")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from vmm.image.store import Store

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "DIGEST", "SIZE", "CREATED"):
        table.add_column(column, no_wrap=True)
    for names, image in Store().images():
        digest = image.digest if args.digests else image.short
        for name in names or ["<none>"]:
            table.add_row(name, digest, _size(int(image.info.get("size", 0))),
                          str(image.info.get("created", ""))[:19].replace("T", " "))
    Console(soft_wrap=True).print(table)
    return 0
