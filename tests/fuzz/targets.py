"""Fuzz targets of guest- and file-facing parsers (issue 14, item 4).

Each target is ``(strategy, check)``: ``check(value)`` feeds the arbitrary input to one
parser and lets out only that parser's documented exceptions (anything else, or a hang,
is a failure). Used by tests/fuzz/test_fuzz.py (a small budget in the suite) and by
scripts/fuzz.py (long runs).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

from hypothesis import strategies as st

MEM = 2 << 20


def _frames(chunks: list[bytes]) -> None:
    """Agent frames (vmm/guest.py FrameParser): chunks in any split; only
    ProtocolError, and every frame within MAX_PAYLOAD."""
    from vmm.guest import MAX_PAYLOAD, FrameParser, ProtocolError
    parser = FrameParser()
    try:
        for chunk in chunks:
            for ftype, payload in parser.feed(chunk):
                assert len(payload) <= MAX_PAYLOAD
    except ProtocolError:
        pass


def _elf(data: bytes) -> None:
    """ELF vmlinux (vmm/loader/elf.py) into a small guest RAM: only LoaderError or
    GuestMemoryError (both one-line user errors); GuestMemory bounds-checks writes."""
    from vmm.loader.errors import LoaderError
    from vmm.memory import GuestMemory, GuestMemoryError
    from vmm.loader.elf import load_elf
    with GuestMemory(MEM) as mem:
        try:
            load_elf(mem, io.BytesIO(data), len(data))
        except (LoaderError, GuestMemoryError):
            pass


def _elf_header(data: bytes) -> bytes:
    # A valid ELF64 identification so the fuzzer gets past the magic check.
    return b"\x7fELF\x02\x01\x01" + bytes(9) + data


def _bzimage(data: bytes) -> None:
    """bzImage setup header (vmm/loader/bzimage.py parse_setup_header): only LoaderError."""
    from vmm.loader.bzimage import parse_setup_header, protected_mode_load_address
    from vmm.loader.errors import LoaderError
    head = bytearray(data.ljust(0x280, b"\0")[:0x1000])
    head[0x202:0x206] = b"HdrS"          # boot protocol 2.x magic at 0x202
    head[0x1FE:0x200] = b"\x55\xaa"
    try:
        hdr = parse_setup_header(bytes(head), len(head) + len(data))
        protected_mode_load_address(hdr)
    except LoaderError:
        pass


_SNAP = {}


def _snapshot_template() -> str:
    """A valid snapshot directory, written once per process."""
    if "dir" not in _SNAP:
        from vmm.memory import GuestMemory
        from vmm.snapshot import write_snapshot
        base = tempfile.mkdtemp(prefix="pyvmm-fuzz-")
        with GuestMemory(MEM) as m:
            m.write(0x1000, b"page")
            write_snapshot(os.path.join(base, "snap"), memory=m, deps={"vcpus": 1},
                           state={"vcpus": [{"regs": {"rip": 1}}], "devices": {}})
        _SNAP["dir"] = os.path.join(base, "snap")
    return _SNAP["dir"]


def _snapshot(mutation: tuple[int, list[tuple[int, int]], int | None]) -> None:
    """Snapshot files (vmm/snapshot/format.py read_snapshot) with one file's bytes
    flipped or it truncated: only SnapshotError."""
    from vmm.snapshot import SnapshotError, read_snapshot
    template = _snapshot_template()
    which, flips, cut = mutation
    work = tempfile.mkdtemp(prefix="pyvmm-fuzz-")
    try:
        d = os.path.join(work, "snap")
        shutil.copytree(template, d)
        names = sorted(n for n in os.listdir(d) if os.path.getsize(os.path.join(d, n)) < 1 << 20)
        path = os.path.join(d, names[which % len(names)])
        with open(path, "rb") as f:
            data = bytearray(f.read())
        for offset, xor in flips:
            if data:
                data[offset % len(data)] ^= xor or 1
        if cut is not None:
            del data[cut % (len(data) + 1):]
        with open(path, "wb") as f:
            f.write(data)
        try:
            read_snapshot(d, expect_deps={"vcpus": 1})
        except SnapshotError:
            pass
    finally:
        shutil.rmtree(work)


def _virtqueue(rings: bytes) -> None:
    """The split virtqueue walk (vmm/devices/virtio/queue.py): descriptor table, avail
    ring and guest RAM around them all fuzz bytes; pop every chain the ring offers and
    complete it. Only QueueError (the ring is unusable), and every descriptor that
    claims to be in RAM lies inside guest RAM (virtio 1.2 §2.7.5, §2.7.13)."""
    from vmm.devices.virtio.queue import Queue, QueueError
    from vmm.memory import GuestMemory
    size = 16
    with GuestMemory(MEM) as mem:
        mem.write(0, rings[:0x4000])
        # avail.idx mostly within the queue size, so that chains are walked (§2.7.6)
        mem.write(0x1002, bytes([rings[1] % (size + 2), 0]))
        heads = bytes(b for i in range(size) for b in ((rings[0x100 + i] % (size + 1)), 0))
        mem.write(0x1004, heads)            # mostly heads inside the table
        q = Queue(256)
        q.size = size
        q.desc_table, q.avail_ring, q.used_ring = 0, 0x1000, 0x2000
        q.ready = True
        q.activate(mem, event_idx=bool(rings[:1] and rings[0] & 1), indirect=True)
        try:
            for _ in range(2 * size):       # more pops than the ring may offer
                chain = q.pop()
                if chain is None:
                    break
                for d in chain.readable() + chain.writable():
                    if d.in_ram:
                        assert d.addr + d.len <= MEM, d
                q.add_used(chain.head_index, 0)
        except QueueError:
            pass


TARGETS = {
    "virtqueue": (st.binary(min_size=0x1000, max_size=0x3000), _virtqueue),
    "frames": (st.lists(st.binary(max_size=64), max_size=16), _frames),
    "elf": (st.binary(max_size=512).map(_elf_header), _elf),
    "bzimage": (st.binary(max_size=0x300), _bzimage),
    "snapshot": (st.tuples(st.integers(0, 16),
                           st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                    max_size=4),
                           st.none() | st.integers(0, 1 << 20)), _snapshot),
}
