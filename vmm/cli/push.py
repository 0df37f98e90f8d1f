"""``pyvmm push NAME REF``: send a stored image to a registry (or an oci:/archive file).

The image goes as it was pulled (its OCI layout in the store: same manifest, same
digest), with ``skopeo copy``. Prints the digest. Exit status 0, or 2 with one line
(NAME not in the store, a bad REF, an unreachable registry).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``push`` command to ``pyvmm``'s subparsers."""
    p = subparsers.add_parser("push", help="push an image from the local store to a registry")
    p.add_argument("name", metavar="NAME", help="image in the store (name or digest)")
    p.add_argument("ref", metavar="REF", help="destination, e.g. registry.example:5000/app:1")
    p.add_argument("--tls-verify", default="true", choices=("true", "false"),
                   help="require HTTPS and verify the registry's certificate (default true)")


def main(args) -> int:
    from vmm.image.push import push
    print(push(args.name, args.ref, tls_verify=args.tls_verify == "true"))
    return 0
