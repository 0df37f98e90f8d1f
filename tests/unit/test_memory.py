from __future__ import annotations

import pytest

from tests.conftest import requires_kvm

from vmm.arch.x86_64 import layout
from vmm.memory import GuestMemory, GuestMemoryError, parse_size, ram_regions


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("64", 64 << 20), ("2048K", 2 << 20),
    ("1g", 1 << 30), ("256MiB", 256 << 20), (" 3 G ", 3 << 30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "12X", "1.5G", "G", "abc"])
def test_parse_size_rejects(text):
    with pytest.raises(GuestMemoryError):
        parse_size(text)


def test_small_guest_is_one_region_at_zero():
    assert [(r.guest_addr, r.size) for r in ram_regions(512 << 20)] == [(0, 512 << 20)]


def test_large_guest_skips_the_mmio_gap():
    regions = ram_regions(5 << 30)
    assert [(r.guest_addr, r.size, r.host_offset) for r in regions] == [
        (0, layout.MMIO_GAP_START, 0),
        (1 << 32, (5 << 30) - layout.MMIO_GAP_START, layout.MMIO_GAP_START)]


def test_bounds_checked_access():
    with GuestMemory(4 << 20) as mem:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        mem.write_int(0x2000, 8, 0x1122334455667788)
        assert mem.read(0x2000, 2) == b"\x88\x77"
        for gpa, n in ((mem.size - 1, 2), (mem.size, 1), (-1, 1), (1 << 40, 1)):
            assert not mem.contains(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, b"x" * n)


def test_access_spanning_the_gap_is_refused():
    with GuestMemory(4 << 30) as mem:          # MAP_NORESERVE: nothing is touched
        mem.write(layout.MMIO_GAP_END, b"hi")
        assert mem.read(layout.MMIO_GAP_END, 2) == b"hi"
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_GAP_START - 1, 2)
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_GAP_START, 1)


def test_size_limits():
    with pytest.raises(GuestMemoryError):
        GuestMemory(0)
    with pytest.raises(GuestMemoryError):
        GuestMemory(10 << 40)


def test_translate_agrees_with_view():
    with GuestMemory(4 << 30) as mem:          # two regions, around the MMIO gap
        assert mem.spans == tuple((r.guest_addr, r.end, r.host_offset) for r in mem.regions)
        high = layout.MMIO_GAP_END
        mem.write(high + 8, b"xyz")
        off = mem.translate(high + 8, 3)
        assert off == layout.MMIO_GAP_START + 8
        assert bytes(mem.host_view[off:off + 3]) == b"xyz"
        assert mem.translate(0x1000, 16) == 0x1000
        for gpa, n in ((layout.MMIO_GAP_START - 1, 2), (layout.MMIO_GAP_START, 1),
                       (high + mem.regions[1].size, 1), (0, -1), ((1 << 64) - 1, 2)):
            assert mem.translate(gpa, n) == -1
            assert not mem.contains(gpa, n)


def test_host_u16_is_the_mapping_as_words():
    mem = GuestMemory(4 << 30)
    off = mem.translate(layout.MMIO_GAP_END + 6, 2)
    mem.host_u16[off >> 1] = 0xBEEF
    assert mem.read(layout.MMIO_GAP_END + 6, 2) == b"\xef\xbe"   # little-endian
    mem.write(0x10, b"\x34\x12")
    assert mem.host_u16[0x10 >> 1] == 0x1234
    mem.close()                                   # the word view does not keep the map
    assert mem.host_buffer is None


# -- saving to a sparse file and mapping it back --------------------------------------

def _file_digest(path) -> tuple[str, int]:
    import hashlib
    import os
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture
def saved(tmp_path):
    """A 32 MiB RAM file with a few non-zero pages: (path, {gpa: bytes})."""
    pages = {0x0: b"\x01first", 0x5000: b"mid", 0x1234_5678 & 0x1FF_FFFF: b"odd",
             (32 << 20) - 3: b"end"}
    path = tmp_path / "memory"
    with GuestMemory(32 << 20) as mem:
        for gpa, data in pages.items():
            mem.write(gpa, data)
        stored = mem.save_to(str(path))
    assert stored == 4 * 4096                      # four distinct non-zero pages
    return path, pages


def test_save_to_writes_a_sparse_file_of_the_ram_size(saved):
    import os
    path, _ = saved
    st = os.stat(path)
    assert st.st_size == 32 << 20
    assert st.st_blocks * 512 <= 64 * 4096          # ~16 KiB stored, far below 32 MiB


def test_save_to_stores_every_byte(saved):
    path, pages = saved
    data = path.read_bytes()
    expected = bytearray(32 << 20)
    for gpa, chunk in pages.items():
        expected[gpa:gpa + len(chunk)] = chunk
    assert data == bytes(expected)


def test_save_to_of_large_nonzero_runs(tmp_path):
    with GuestMemory(4 << 20) as mem:
        mem.write(0x10000 - 10, b"\xaa" * (3 * 65536))   # straddles four chunks
        assert mem.save_to(str(tmp_path / "m")) == 49 * 4096
        assert (tmp_path / "m").read_bytes() == bytes(mem.host_view)


def test_save_to_refuses_an_existing_file(tmp_path):
    target = tmp_path / "m"
    target.write_bytes(b"keep")
    with GuestMemory(2 << 20) as mem, pytest.raises(GuestMemoryError, match="exists"):
        mem.save_to(str(target))
    assert target.read_bytes() == b"keep"


def test_save_to_failure_leaves_no_file(tmp_path, monkeypatch):
    import os
    def fail(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", fail)
    with GuestMemory(2 << 20) as mem:
        mem.write(0, b"x")
        with pytest.raises(GuestMemoryError, match="No space left"):
            mem.save_to(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_from_file_maps_the_same_bytes(saved):
    path, pages = saved
    with GuestMemory.from_file(str(path), 32 << 20) as mem:
        assert mem.size == 32 << 20
        assert mem.regions == ram_regions(32 << 20)
        assert mem.backing_path == str(path)
        for gpa, data in pages.items():
            assert mem.read(gpa, len(data)) == data
        assert mem.read(0x100000, 4) == bytes(4)
        off = mem.translate(0x5000, 3)
        assert bytes(mem.host_view[off:off + 3]) == b"mid"
        assert mem.host_u16[0] == 0x6601               # b"\x01f"


def test_writes_to_a_file_mapping_never_reach_the_file(saved):
    path, _ = saved
    before = _file_digest(path)
    with GuestMemory.from_file(str(path), 32 << 20) as mem:
        mem.write(0x5000, b"MID")                     # a page that is in the file
        mem.write(0x80_0000, b"new")                  # a hole in the file
        mem.write_int(0x10, 8, -1)
        mem.host_buffer.flush()                       # msync: a private map has nothing to sync
        assert mem.read(0x5000, 3) == b"MID"
        assert mem.read(0x80_0000, 3) == b"new"
    assert _file_digest(path) == before


def test_two_file_mappings_are_independent(saved):
    path, _ = saved
    a = GuestMemory.from_file(str(path), 32 << 20)
    b = GuestMemory.from_file(str(path), 32 << 20)
    a.write(0x5000, b"AAA")
    b.write(0x5000, b"BBB")
    b.write(0x6000, b"b only")
    assert a.read(0x5000, 3) == b"AAA" and b.read(0x5000, 3) == b"BBB"
    assert a.read(0x6000, 6) == bytes(6)
    a.close()
    assert b.read(0x0, 6) == b"\x01first"
    b.close()


def test_save_of_a_file_mapping_holds_its_own_writes(saved, tmp_path):
    path, _ = saved
    with GuestMemory.from_file(str(path), 32 << 20) as mem:
        mem.write(0x7000, b"later")
        assert mem.save_to(str(tmp_path / "again")) == 5 * 4096
        assert (tmp_path / "again").read_bytes() == bytes(mem.host_view)
        with pytest.raises(GuestMemoryError, match="exists"):   # never its own file
            mem.save_to(str(path))


def test_from_file_refuses_a_wrong_size(saved, tmp_path):
    path, _ = saved
    with pytest.raises(GuestMemoryError, match=r"holds 33554432 bytes, expected 67108864"):
        GuestMemory.from_file(str(path), 64 << 20)
    with pytest.raises(GuestMemoryError, match="multiple of 2 MiB"):
        GuestMemory.from_file(str(path), (32 << 20) - 4096)
    with pytest.raises(GuestMemoryError, match="cannot open"):
        GuestMemory.from_file(str(tmp_path / "absent"), 32 << 20)
    with pytest.raises(GuestMemoryError, match="out of range"):
        GuestMemory.from_file(str(path), 0)


@requires_kvm
def test_a_file_mapping_works_as_a_kvm_memory_slot(tmp_path):
    """A guest reads a value the RAM file holds and writes value+1: the write lands in
    this VM's private copy and not in the file."""
    import ctypes
    import hashlib
    import struct

    from vmm import kvm as kvmlib
    from vmm.arch.x86_64 import cpu
    from vmm.kvm import exits

    entry, src, dst = 0x40000, 0x80000, 0x80008
    code = (b"\x8b\x04\x25" + struct.pack("<I", src)        # mov eax, [src]
            + b"\xff\xc0"                                    # inc eax
            + b"\x89\x04\x25" + struct.pack("<I", dst)       # mov [dst], eax
            + b"\xe6" + bytes([layout.DEBUG_EXIT_PORT])      # out DEBUG_EXIT_PORT, al
            + b"\xf4")                                       # hlt
    path = tmp_path / "memory"
    with GuestMemory(2 << 20) as mem:
        cpu.write_boot_tables(mem)
        mem.write(entry, code)
        mem.write_int(src, 4, 0x1233)
        mem.save_to(str(path))
    before = hashlib.sha256(path.read_bytes()).digest()

    with kvmlib.Kvm() as kvm, GuestMemory.from_file(str(path), 2 << 20) as mem:
        vm = kvm.create_vm()
        vcpu = None
        anchor = ctypes.c_char.from_buffer(mem.host_buffer)
        try:
            vm.set_tss_addr(layout.KVM_TSS_ADDR)
            vm.set_user_memory_region(0, mem.size, ctypes.addressof(anchor))
            vcpu = vm.create_vcpu(0)
            cpu.setup_long_mode(vcpu, entry)
            exit = exits.decode(vcpu.run_page, vcpu.run())
        finally:
            if vcpu is not None:
                vcpu.close()
            vm.close()
            del anchor                          # the buffer export, before mem.close()
        assert isinstance(exit, exits.IoOut) and exit.port == layout.DEBUG_EXIT_PORT
        assert mem.read_int(dst, 4) == 0x1234
    assert hashlib.sha256(path.read_bytes()).digest() == before
