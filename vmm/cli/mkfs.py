"""``pyvmm mkfs SOURCE IMAGE``: make an ext4 disk image from a host directory."""

from __future__ import annotations

from vmm.cli.common import UsageError


def add_parser(subparsers) -> None:
    """Add the ``mkfs`` command to ``pyvmm``'s subparsers."""
    m = subparsers.add_parser(
        "mkfs", help="make an ext4 disk image from a host directory (no root needed)")
    m.add_argument("source",
                   help="host directory to copy into the image ('-' for an empty filesystem)")
    m.add_argument("image", help="image file to create")
    m.add_argument("--size", help="image size, e.g. 64M (default: the directory's size plus room)")


def main(args) -> int:
    from vmm.images import make_ext4
    from vmm.memory import GuestMemoryError, parse_size
    try:
        size = parse_size(args.size) if args.size else None
    except GuestMemoryError as e:
        raise UsageError(f"--size: {e}") from None
    make_ext4(None if args.source == "-" else args.source, args.image, size)
    return 0
