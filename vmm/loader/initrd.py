"""Place an initrd in guest RAM (boot.rst, "THE ACTUAL BOOT" / ramdisk_image).

Like other boot loaders, pyvmm puts the initrd as high as it may go: page-aligned,
ending at or below initrd_addr_max (setup header 0x22c) and below the top of RAM
under 4 GiB, and starting above the kernel (LoadedKernel.load_end).
"""

from __future__ import annotations

import os
from pathlib import Path

from vmm.loader.errors import LoaderError

PAGE_SIZE = 0x1000


def load_initrd(mem, path: str | Path, *, kernel, initrd_addr_max: int | None = None
                ) -> tuple[int, int]:
    """Copy an initrd file into guest RAM, straight from the file into guest memory.

    Args:
        mem: the guest's GuestMemory.
        path: the initrd / initramfs file.
        kernel: the LoadedKernel already in memory (its load_end is the lower bound).
        initrd_addr_max: highest byte address the initrd may occupy; default
            ``kernel.initrd_addr_max`` (from the setup header).
    Returns:
        (guest physical address, size in bytes), for boot_params ramdisk_image/size.
    Raises:
        LoaderError: unreadable, empty, or does not fit.
    """
    path = Path(path)
    if initrd_addr_max is None:
        initrd_addr_max = kernel.initrd_addr_max
    from vmm.hostfiles import HostFileError, open_regular
    try:
        f = open_regular(path, "initrd")      # a FIFO would block open() forever
    except HostFileError as e:
        raise LoaderError(str(e)) from None
    except OSError as e:
        raise LoaderError(f"{path}: cannot read initrd: {e.strerror or e}") from None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise LoaderError(f"{path}: initrd is empty")
            low_ram_top = mem.regions[0].end           # RAM below 4 GiB ends here
            top = min(initrd_addr_max + 1, low_ram_top)
            addr = (top - size) & ~(PAGE_SIZE - 1)
            bottom = (kernel.load_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            if size > top or addr < bottom or not mem.contains(addr, size):
                raise LoaderError(
                    f"{path}: initrd ({-(-size // (1 << 20))} MiB) does not fit in guest RAM "
                    f"between the kernel (ends at {bottom:#x}) and {top:#x}; give the guest "
                    "more memory")
            dst = mem.view(addr, size)
            got = 0
            while got < size:
                n = f.readinto(dst[got:])
                if not n:
                    raise LoaderError(f"{path}: initrd shrank while being read")
                got += n
            return addr, size
    except OSError as e:
        raise LoaderError(f"{path}: cannot read initrd: {e.strerror or e}") from None
