#!/usr/bin/env python3
"""Build (or find in the cache) pyvmm's default Linux guest and print the paths.

Usage: scripts/build-guest.py [--compression gzip|bzip2|lzma|xz|lz4|zstd] [--initramfs-only]

Prints one "name: path" line per artifact on stdout (progress goes to stderr, only on
a terminal). Exit status 1 with a one-line error if the build fails.
"""

import argparse
import sys
from pathlib import Path

from vmm import guestbuild


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="gzip",
                        choices=["gzip", "bzip2", "lzma", "xz", "lz4", "zstd"],
                        help="bzImage payload compression (default: gzip)")
    parser.add_argument("--initramfs-only", action="store_true",
                        help="build only the initramfs")
    args = parser.parse_args()
    try:
        if not args.initramfs_only:
            k = guestbuild.build_kernel(args.compression)
            print(f"vmlinux: {k.vmlinux}")
            print(f"bzImage: {k.bzimage}")
            print(f"System.map: {k.system_map}")
            print(f"config: {k.config}")
        print(f"initramfs: {guestbuild.build_initramfs()}")
    except guestbuild.GuestBuildError as e:
        print(f"build-guest: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
