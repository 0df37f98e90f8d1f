"""``pyvmm rmi NAME...``: remove images from the local store.

NAME is a tag (the name ``pyvmm images`` shows: that tag goes, and the image with its
last tag) or a digest or digest prefix (the image and all its tags go). Exit status 0,
or 2 with one line when a NAME is not in the store (the others are still removed).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``rmi`` command to ``pyvmm``'s subparsers."""
    p = subparsers.add_parser("rmi", help="remove images from the local store")
    p.add_argument("names", nargs="+", metavar="NAME", help="image name (tag) or digest")


def main(args) -> int:
    from vmm.cli.common import EXIT_USAGE, err
    from vmm.image.pull import Reference
    from vmm.image.store import Store, StoreError

    store, status = Store(), 0
    for name in args.names:
        try:
            try:
                removed = store.remove(name)
            except StoreError as first:
                alias = Reference.store_name(name)   # "app" -> "app:latest"
                if alias == name:
                    raise
                try:
                    removed = store.remove(alias)
                except StoreError:
                    raise first from None
        except StoreError as e:
            err(str(e))
            status = EXIT_USAGE
            continue
        for item in removed:
            print(f"{'Deleted' if item.startswith('sha256:') else 'Untagged'}: {item}")
    return status
