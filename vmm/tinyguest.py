"""Builds the bare-metal test guests in guests/tiny/ from source with gcc and ld.

Each guest is one assembly file (preprocessed by gcc, so ``defines`` work) linked at
1 MiB into a static ELF. A guest may instead be one freestanding C file,
``<name>.c``, that carries its own ``_start`` as top-level asm (see blkbench.c); it
is compiled with C_FLAGS, which keep gcc to instructions KVM's emulator executes
(no SSE, no CET ``endbr64``, no stack protector). Results are cached by content hash
under the pyvmm cache directory, so a test run rebuilds only what changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from vmm.errors import UserError
from vmm.paths import cache_dir as _cache_dir, guests_dir

SOURCE_DIR = Path(guests_dir()) / "tiny"


#: gcc flags for C guests: freestanding, no red zone (no IDT stack switching to care
#: about), general-purpose registers only, position-dependent code linked at 1 MiB.
C_FLAGS = ["-ffreestanding", "-nostdlib", "-mno-red-zone", "-mno-sse", "-mno-mmx",
           "-mgeneral-regs-only", "-march=x86-64", "-O2", "-fno-pic", "-fno-pie", "-static",
           "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
           "-fno-builtin", "-Wall"]


class TinyGuestError(UserError):
    """A test guest could not be built (missing toolchain or a source error)."""


def cache_dir() -> Path:
    return Path(_cache_dir())


def available() -> list[str]:
    return sorted({p.stem for p in (*SOURCE_DIR.glob("*.S"), *SOURCE_DIR.glob("*.c"))})


def build(name: str, defines: dict[str, object] | None = None) -> Path:
    """Build guests/tiny/<name>.S or <name>.c (cached) and return the ELF's path."""
    src = SOURCE_DIR / f"{name}.S"
    if not src.is_file():
        src = SOURCE_DIR / f"{name}.c"
    if not src.is_file():
        raise TinyGuestError(f"no test guest named {name!r} (have: {', '.join(available())})")
    compile_flags = C_FLAGS if src.suffix == ".c" else ["-nostdlib", "-ffreestanding"]
    flags = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    h = hashlib.sha256()
    # Every header a guest can include (tiny.h, virtio_mmio.h) is part of the key.
    for part in (src, *sorted(SOURCE_DIR.glob("*.h")), SOURCE_DIR / "link.ld"):
        h.update(part.read_bytes())
    h.update(" ".join(flags if src.suffix == ".S" else compile_flags + flags).encode())
    out = cache_dir() / "tiny" / f"{name}-{h.hexdigest()[:16]}.elf"
    if out.is_file():
        return out
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise TinyGuestError(f"{tool} not found: install build-essential (scripts/setup-host.sh)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, elf = Path(tmp) / "guest.o", Path(tmp) / "guest.elf"
        try:
            subprocess.run(["gcc", "-c", *compile_flags, f"-I{SOURCE_DIR}", *flags,
                            "-o", str(obj), str(src)], check=True, capture_output=True, text=True)
            subprocess.run(["ld", "-static", "-nostdlib", "-z", "max-page-size=4096",
                            "-T", str(SOURCE_DIR / "link.ld"), "-o", str(elf), str(obj)],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            raise TinyGuestError(f"building {src.name} failed: {e.stderr.strip()}") from None
        os.replace(elf, out)
    return out
