"""``pyvmm build -t NAME [-f Containerfile] CONTEXT``: an image from a Containerfile.

RUN steps run inside a pyvmm guest (vmm/image/build.py); the result lands in the store
as NAME. Steps and RUN output go to stderr, the image's digest to stdout. Exit status
0, or 2 with one line (a syntax error names FILE:LINE; a failed RUN names its line).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    """Add the ``build`` command to ``pyvmm``'s subparsers."""
    p = subparsers.add_parser("build", help="build an image from a Containerfile "
                                            "(RUN steps in a pyvmm guest)")
    p.add_argument("context", metavar="CONTEXT", help="directory COPY/ADD read from")
    p.add_argument("-t", "--tag", required=True, metavar="NAME", help="name of the image")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the Containerfile (default CONTEXT/Containerfile, else "
                        "CONTEXT/Dockerfile)")


def main(args) -> int:
    import os
    import sys

    from vmm.cli.common import UsageError
    from vmm.image.build import build

    if not os.path.isdir(args.context):
        raise UsageError(f"{args.context}: not a directory")
    path = args.file
    if path is None:
        path = os.path.join(args.context, "Containerfile")
        if not os.path.exists(path):
            path = os.path.join(args.context, "Dockerfile")

    def output(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    image = build(path, args.context, args.tag, output=output,
                  say=lambda line: print(line, file=sys.stderr, flush=True))
    print(image.digest)
    return 0
