"""``pyvmm pull REF``: an OCI image into the local store (vmm/image/pull.py).

REF: ``[docker://][HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST]``, ``oci:DIR[:TAG]``,
``oci-archive:FILE[:TAG]`` or ``docker-archive:FILE[:REF]``. Prints the image's digest.
Exit status 0, or 2 with one line (bad reference, unreachable registry, corrupt image;
the store is unchanged), 1 when a tool (skopeo, umoci, e2fsprogs) is missing.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``pull`` command to ``pyvmm``'s subparsers."""
    p = subparsers.add_parser(
        "pull", help="pull an OCI image (registry, oci:, oci-archive:, docker-archive:) "
                     "into the local store")
    p.add_argument("ref", metavar="REF", help="image reference, e.g. "
                   "registry.example:5000/app:1, oci:DIR:TAG, docker-archive:FILE")
    p.add_argument("--tls-verify", default="true", choices=("true", "false"),
                   help="require HTTPS and verify the registry's certificate (default true)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")


def main(args) -> int:
    from vmm.image.pull import pull
    image = pull(args.ref, tls_verify=args.tls_verify == "true",
                 quiet=True if args.quiet else None)
    print(image.digest)
    return 0
