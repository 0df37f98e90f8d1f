"""Kernel/initrd loader tests: synthetic ELF and bzImage files, no VM."""

from __future__ import annotations

import atexit
import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.arch.x86_64 import layout
from vmm.loader import LoadedKernel, LoaderError, SymbolTable, load_initrd, load_kernel
from vmm.loader import decompress
from vmm.memory import GuestMemory

MiB = layout.MiB
KERNEL_PADDR = 0x100_0000                 # 16 MiB, like LOAD_PHYSICAL_ADDR
KERNEL_VADDR = 0xFFFF_FFFF_8100_0000


# --- image builders ------------------------------------------------------------------
def make_elf(segments, entry, *, elf_class=2, machine=62, e_type=2) -> bytes:
    """An ELF64 with one PT_LOAD per (paddr, vaddr, data, memsz) segment."""
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    phdrs, blobs = b"", b""
    for paddr, vaddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off, vaddr, paddr, len(data), memsz, 0x1000)
        blobs += data
    ident = b"\x7fELF" + bytes([elf_class, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0,
                       ehsize, phentsize, len(segments), 64, 0, 0)
    return ehdr + phdrs + blobs


def vmlinux_like(text: bytes = b"\x90" * 64 + b"\xf4", bss: int = 0x3000, *,
                 paddr: int = KERNEL_PADDR, entry: int | None = None) -> bytes:
    """Two segments like a vmlinux: text at 16 MiB (+ a data/bss segment after it)."""
    data = bytes(range(256)) * 4
    return make_elf([(paddr, KERNEL_VADDR, text, len(text)),
                     (paddr + 0x20_0000, KERNEL_VADDR + 0x20_0000, data, len(data) + bss)],
                    paddr if entry is None else entry)


SETUP_SECTS = 4
PAYLOAD_OFFSET = 0x400                    # inside the protected-mode part


def make_bzimage(payload: bytes, *, version=0x020F, loadflags=0x01, xloadflags=0x03,
                 setup_sects=SETUP_SECTS, relocatable=1, pref_address=KERNEL_PADDR,
                 init_size=0x80_0000, kernel_alignment=0x20_0000, cmdline_size=2047,
                 initrd_addr_max=0x7FFF_FFFF, boot_flag=0xAA55, magic=b"HdrS",
                 jump=0x6A, tail=b"\0" * 16) -> bytes:
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes([0xEB, jump])
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x248, PAYLOAD_OFFSET)
    struct.pack_into("<I", setup, 0x24C, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    pm = bytearray(PAYLOAD_OFFSET)
    pm[0x200:0x202] = b"\xeb\xfe"         # "startup_64" of the decompressor: jmp .
    return bytes(setup) + bytes(pm) + payload + tail


def size_append(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw) & 0xFFFFFFFF)


def lz4_legacy(raw: bytes) -> bytes:
    out = struct.pack("<I", 0x184C2102)
    for i in range(0, len(raw), 8 * MiB):
        block = lz4.block.compress(raw[i:i + 8 * MiB], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


COMPRESSORS = {
    "gzip": lambda raw: gzip.compress(raw, 9, mtime=0),
    "xz": lambda raw: lzma.compress(raw, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=[
        {"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]),
    "lzma": lambda raw: lzma.compress(raw, lzma.FORMAT_ALONE, preset=9),
    "bzip2": lambda raw: bz2.compress(raw, 9),
    "lz4": lz4_legacy,
    "zstd": lambda raw: zstandard.ZstdCompressor(level=19, write_content_size=False).compress(raw),
}


def payload_for(codec: str, raw: bytes) -> bytes:
    return COMPRESSORS[codec](raw) + size_append(raw)


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(64 * MiB) as m:
        yield m


@pytest.fixture
def fresh_mem():
    with GuestMemory(64 * MiB) as m:
        yield m


def write(tmp_path: Path, data: bytes, name: str = "kernel.img") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- plain ELF -----------------------------------------------------------------------
def test_elf_segments_land_at_paddr_and_bss_is_zeroed(tmp_path, fresh_mem):
    fresh_mem.write(KERNEL_PADDR + 0x20_0000, b"\xAA" * 0x4000)   # stale bytes in .bss
    img = vmlinux_like()
    k = load_kernel(fresh_mem, write(tmp_path, img))
    assert (k.kind, k.entry, k.setup_header, k.codec) == ("elf", KERNEL_PADDR, None, None)
    assert fresh_mem.read(KERNEL_PADDR, 65) == b"\x90" * 64 + b"\xf4"
    assert fresh_mem.read(KERNEL_PADDR + 0x20_0000, 1024) == bytes(range(256)) * 4
    assert fresh_mem.read(KERNEL_PADDR + 0x20_0000 + 1024, 0x3000) == bytes(0x3000)
    assert k.load_end == KERNEL_PADDR + 0x20_0000 + 1024 + 0x3000
    assert k.initrd_addr_max == 0x7FFF_FFFF


def test_elf_virtual_entry_is_translated(tmp_path, mem):
    k = load_kernel(mem, write(tmp_path, vmlinux_like(entry=KERNEL_VADDR + 0x10)))
    assert k.entry == KERNEL_PADDR + 0x10


def test_static_test_guest_at_1mib(tmp_path, mem):
    code = b"\xb0\x2a\xe6\xf4\xf4"          # mov al, 42; out 0xf4, al; hlt
    img = make_elf([(0x100000, 0x100000, code, len(code))], 0x100000)
    k = load_kernel(mem, write(tmp_path, img), mode="elf")
    assert k.entry == 0x100000 and mem.read(0x100000, 5) == code


@pytest.mark.parametrize("img, message", [
    (make_elf([(KERNEL_PADDR, KERNEL_PADDR, b"x", 1)], 0x5000), "outside every loadable"),
    (make_elf([(0x8000, 0x8000, b"x", 1)], 0x8000), "below 0x100000"),
    (make_elf([(KERNEL_PADDR, 0, b"x", 1)], KERNEL_PADDR, elf_class=1), "32-bit ELF"),
    (make_elf([(KERNEL_PADDR, 0, b"x", 1)], KERNEL_PADDR, machine=183), "not x86-64"),
    (make_elf([(KERNEL_PADDR, 0, b"x", 1)], KERNEL_PADDR, e_type=1), "not an executable"),
    (make_elf([], KERNEL_PADDR), "no program headers"),
    (make_elf([(KERNEL_PADDR, 0, b"x", 0)], KERNEL_PADDR), "no loadable"),
    (make_elf([(KERNEL_PADDR, 0, b"xy", 1)], KERNEL_PADDR), "p_filesz"),
    (vmlinux_like()[:-10], "truncated ELF segment"),
    (vmlinux_like()[:40], "truncated ELF header"),
    (vmlinux_like()[:100], "truncated ELF program headers"),
])
def test_bad_elf(tmp_path, mem, img, message):
    with pytest.raises(LoaderError, match=message) as e:
        load_kernel(mem, write(tmp_path, img))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path))


def test_elf_too_large_for_ram(tmp_path, mem):
    img = make_elf([(KERNEL_PADDR, KERNEL_VADDR, b"x", 100 * MiB)], KERNEL_PADDR)
    with pytest.raises(LoaderError, match=r"kernel needs 116 MiB of RAM, guest has 64 MiB$"):
        load_kernel(mem, write(tmp_path, img))


def test_elf_segment_in_mmio_gap(tmp_path):
    img = make_elf([(layout.MMIO_GAP_START - 0x1000, 0, b"x", 0x2000)], layout.MMIO_GAP_START)
    with GuestMemory(4 * layout.GiB) as m:
        with pytest.raises(LoaderError, match="MMIO gap"):
            load_kernel(m, write(tmp_path, img))


def test_elf_rejected_in_bzimage_mode(tmp_path, mem):
    with pytest.raises(LoaderError, match="not a bzImage"):
        load_kernel(mem, write(tmp_path, vmlinux_like()), mode="bzimage")


# --- bzImage, decompressed on the host -----------------------------------------------
@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_bzimage_every_codec_round_trip(tmp_path, fresh_mem, codec):
    vmlinux = vmlinux_like(text=os.urandom(3000) + b"\xf4") + b"RELOCS" * 10
    img = make_bzimage(payload_for(codec, vmlinux))
    k = load_kernel(fresh_mem, write(tmp_path, img))
    assert (k.kind, k.codec, k.entry, k.fallback_reason) == ("elf", codec, KERNEL_PADDR, None)
    assert fresh_mem.read(KERNEL_PADDR, 3001) == vmlinux[176:176 + 3001]
    assert k.setup_header == img[0x1F1:0x202 + 0x6A]
    assert fresh_mem.read(KERNEL_PADDR + 0x20_0000, 1024) == bytes(range(256)) * 4


def test_bzimage_uncompressed_payload(tmp_path, mem):
    k = load_kernel(mem, write(tmp_path, make_bzimage(vmlinux_like())))
    assert (k.kind, k.codec) == ("elf", "none")


def test_lz4_legacy_multiple_chunks(tmp_path, fresh_mem):
    big = (os.urandom(1024) * 9 * 1024)        # 9 MiB: two 8 MiB-bounded chunks
    vmlinux = make_elf([(KERNEL_PADDR, KERNEL_VADDR, big, len(big))], KERNEL_PADDR)
    payload = payload_for("lz4", vmlinux)
    assert len(payload) < 1 * MiB
    assert payload.count(struct.pack("<I", 0x184C2102)) >= 1
    k = load_kernel(fresh_mem, write(tmp_path, make_bzimage(payload)))
    assert k.codec == "lz4" and fresh_mem.read(KERNEL_PADDR, len(big)) == big


def test_zstd_streamed_frame_without_content_size(tmp_path, mem):
    vmlinux = vmlinux_like()
    c = zstandard.ZstdCompressor(level=3).compressobj()
    payload = c.compress(vmlinux) + c.flush() + size_append(vmlinux)
    k = load_kernel(mem, write(tmp_path, make_bzimage(payload)))
    assert (k.kind, k.codec) == ("elf", "zstd")


CLI = {  # the commands scripts/Makefile.lib uses to build these payloads
    "gzip": ["gzip", "-n", "-f", "-9"],
    "bzip2": ["bzip2", "-9"],
    "lzma": ["lzma", "-9"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB"],
    "lz4": ["lz4", "-l", "-9"],
    "zstd": ["zstd", "-19", "-q"],
}


@pytest.mark.parametrize("codec", sorted(CLI))
def test_payload_made_by_the_kernel_build_tools(tmp_path, mem, codec):
    if shutil.which(CLI[codec][0]) is None:
        pytest.skip(f"{CLI[codec][0]} not installed")
    vmlinux = vmlinux_like(text=os.urandom(500) + b"\0" * 20000)
    out = subprocess.run(CLI[codec] + ["-c"], input=vmlinux, stdout=subprocess.PIPE,
                         check=True).stdout
    k = load_kernel(mem, write(tmp_path, make_bzimage(out + size_append(vmlinux))))
    assert (k.kind, k.codec) == ("elf", codec)
    assert mem.read(KERNEL_PADDR, 520) == vmlinux[176:696]


# --- bzImage through the in-guest decompressor --------------------------------------
def test_unknown_codec_falls_back_to_in_guest_decompressor(tmp_path, fresh_mem):
    img = make_bzimage(b"\x12\x34" + bytes(200))
    k = load_kernel(fresh_mem, write(tmp_path, img))
    assert k.kind == "bzimage" and k.codec is None
    assert k.entry == KERNEL_PADDR + 0x200
    assert "unknown payload compression" in k.fallback_reason
    pm = img[(SETUP_SECTS + 1) * 512:]
    assert fresh_mem.read(KERNEL_PADDR, len(pm)) == pm
    assert fresh_mem.read(k.entry, 2) == b"\xeb\xfe"
    assert k.load_end == KERNEL_PADDR + 0x80_0000          # pref_address + init_size
    with pytest.raises(LoaderError, match="cannot decompress the bzImage here: unknown"):
        load_kernel(fresh_mem, write(tmp_path, img), mode="elf")


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_corrupt_payload_falls_back(tmp_path, mem, codec):
    good = payload_for(codec, vmlinux_like(text=os.urandom(2000)))
    bad = good[:6] + bytes(b ^ 0x5A for b in good[6:len(good) // 2]) + good[len(good) // 2:]
    k = load_kernel(mem, write(tmp_path, make_bzimage(bad)))
    assert k.kind == "bzimage" and k.codec == codec and k.fallback_reason
    with pytest.raises(LoaderError, match="cannot decompress"):
        load_kernel(mem, write(tmp_path, make_bzimage(bad)), mode="elf")


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_truncated_stream_is_detected(codec):
    raw = vmlinux_like(text=os.urandom(5000))
    data = COMPRESSORS[codec](raw)
    with pytest.raises(LoaderError, match="truncated|corrupt"):
        decompress.decompress(data[:len(data) * 2 // 3], codec, 1 << 30)


def test_decompression_limit(tmp_path):
    data = gzip.compress(bytes(10 * MiB))
    with pytest.raises(LoaderError, match="more than 1 MiB"):
        decompress.decompress(data, "gzip", 1 * MiB)


def test_elf_payload_that_cannot_be_placed_falls_back(tmp_path, mem):
    vmlinux = make_elf([(63 * MiB, 0, b"x" * 16, 2 * MiB)], 63 * MiB)
    k = load_kernel(mem, write(tmp_path, make_bzimage(payload_for("gzip", vmlinux))))
    assert k.kind == "bzimage" and "kernel needs 65 MiB" in k.fallback_reason


def test_decompressed_payload_not_elf_falls_back(tmp_path, mem):
    k = load_kernel(mem, write(tmp_path, make_bzimage(payload_for("gzip", b"hello" * 100))))
    assert k.kind == "bzimage" and "not an ELF" in k.fallback_reason


def test_forced_bzimage_mode_and_non_relocatable(tmp_path, mem):
    img = make_bzimage(payload_for("gzip", vmlinux_like()), relocatable=0)
    k = load_kernel(mem, write(tmp_path, img), mode="bzimage")
    assert (k.kind, k.codec, k.entry) == ("bzimage", None, layout.HIMEM_START + 0x200)
    # init_size counts from where it will run (pref_address), not from 1 MiB
    assert k.load_end == KERNEL_PADDR + 0x80_0000
    assert k.fallback_reason is None


def test_pref_address_rounded_up_to_kernel_alignment(tmp_path, mem):
    img = make_bzimage(b"\x99" * 64, pref_address=0x110_0000, kernel_alignment=0x20_0000)
    assert load_kernel(mem, write(tmp_path, img)).entry == 0x120_0000 + 0x200


def test_bzimage_too_large_for_ram(tmp_path, mem):
    img = make_bzimage(b"\x99" * 64, init_size=80 * MiB)
    with pytest.raises(LoaderError, match="kernel needs 96 MiB of RAM, guest has 64"):
        load_kernel(mem, write(tmp_path, img))


@pytest.mark.parametrize("kwargs, message", [
    (dict(version=0x020A), r"boot protocol 2\.10 is too old"),
    (dict(xloadflags=0), "not 64-bit capable"),
    (dict(loadflags=0), "not a bzImage"),
    (dict(boot_flag=0x1234), "bad boot_flag"),
    (dict(magic=b"HdrX"), r"not a Linux kernel \(no HdrS signature at 0x202\)"),
])
def test_bad_setup_header(tmp_path, mem, kwargs, message):
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, make_bzimage(b"\x99" * 64, **kwargs)))


def test_setup_sects_zero_means_four(tmp_path, mem):
    img = make_bzimage(payload_for("gzip", vmlinux_like()), setup_sects=0)
    assert load_kernel(mem, write(tmp_path, img)).kind == "elf"


def test_truncated_payload_is_an_error_not_a_fallback(tmp_path, mem):
    img = make_bzimage(payload_for("gzip", vmlinux_like()), tail=b"")
    with pytest.raises(LoaderError, match="truncated bzImage"):
        load_kernel(mem, write(tmp_path, img[:-50]))


@pytest.mark.parametrize("data, message", [
    (b"", "file is empty"),
    (b"MZ" + bytes(100), "not a Linux kernel"),
    (os.urandom(5000).replace(b"HdrS", b"xxxx"), "not a Linux kernel"),
    (make_bzimage(b"\x99")[:0x240], "truncated setup header"),
])
def test_not_a_kernel(tmp_path, mem, data, message):
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, data))


def test_missing_file_and_bad_mode(tmp_path, mem):
    with pytest.raises(LoaderError, match="cannot open kernel"):
        load_kernel(mem, tmp_path / "nope")
    with pytest.raises(LoaderError, match="unknown kernel mode"):
        load_kernel(mem, write(tmp_path, vmlinux_like()), mode="raw")


# --- robustness: arbitrary damage only ever raises LoaderError ------------------------
_GOOD_BZ = {c: make_bzimage(payload_for(c, vmlinux_like())) for c in ("gzip", "xz", "lz4", "zstd")}
_GOOD_ELF = vmlinux_like()
_FUZZ_MEM = GuestMemory(32 * MiB)
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="pyvmm-loader-fuzz-"))
atexit.register(shutil.rmtree, _FUZZ_DIR, True)


def _try_load(data: bytes, mode: str) -> None:
    p = _FUZZ_DIR / "k"
    p.write_bytes(data)
    try:
        k = load_kernel(_FUZZ_MEM, p, mode=mode)
    except LoaderError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(k, LoadedKernel) and _FUZZ_MEM.contains(k.entry)


_fuzz = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(codec=st.sampled_from(sorted(_GOOD_BZ)), frac=st.floats(0, 1),
       mode=st.sampled_from(["auto", "elf", "bzimage"]))
def test_truncated_images_raise_only_loader_error(codec, frac, mode):
    good = _GOOD_BZ[codec]
    _try_load(good[:int(len(good) * frac)], mode)
    _try_load(_GOOD_ELF[:int(len(_GOOD_ELF) * frac)], mode)


@_fuzz
@given(codec=st.sampled_from(sorted(_GOOD_BZ)),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                      min_size=1, max_size=8),
       mode=st.sampled_from(["auto", "elf"]))
def test_corrupted_images_raise_only_loader_error(codec, edits, mode):
    for good in (_GOOD_BZ[codec], _GOOD_ELF):
        data = bytearray(good)
        for pos, value in edits:
            # Bias edits toward the headers, where they matter most.
            data[pos % min(len(data), 0x800 if pos & 1 else len(data))] = value
        _try_load(bytes(data), mode)


@_fuzz
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_loader_error(data):
    _try_load(data, "auto")
    _try_load(b"\x7fELF" + data, "auto")


# --- initrd -------------------------------------------------------------------------------
def _kernel(load_end=KERNEL_PADDR + 4 * MiB, header=None):
    return LoadedKernel(entry=KERNEL_PADDR, kind="elf", setup_header=header, load_end=load_end)


def test_initrd_goes_high_and_page_aligned(tmp_path, fresh_mem):
    data = os.urandom(3 * MiB + 123)
    addr, size = load_initrd(fresh_mem, write(tmp_path, data, "initrd"), kernel=_kernel())
    assert size == len(data) and addr % 0x1000 == 0
    assert addr + size <= 64 * MiB and addr + size > 64 * MiB - 0x1000
    assert fresh_mem.read(addr, size) == data


def test_initrd_respects_initrd_addr_max(tmp_path, fresh_mem):
    data = os.urandom(1000)
    addr, size = load_initrd(fresh_mem, write(tmp_path, data, "initrd"), kernel=_kernel(),
                             initrd_addr_max=0x1FF_FFFF)
    assert addr + size <= 0x200_0000 and addr == 0x200_0000 - 0x1000


def test_initrd_addr_max_from_the_setup_header(tmp_path):
    img = make_bzimage(b"\x99" * 64, initrd_addr_max=0x2FF_FFFF)
    with GuestMemory(64 * MiB) as m:
        k = load_kernel(m, write(tmp_path, img))
        assert k.initrd_addr_max == 0x2FF_FFFF
        addr, size = load_initrd(m, write(tmp_path, b"x" * 5000, "initrd"), kernel=k)
        assert addr + size <= 0x300_0000 and addr >= k.load_end


def test_initrd_stays_below_the_mmio_gap(tmp_path):
    with GuestMemory(5 * layout.GiB) as m:
        addr, size = load_initrd(m, write(tmp_path, b"y" * 10000, "initrd"),
                                 kernel=_kernel(), initrd_addr_max=0xFFFF_FFFF)
        assert addr + size <= layout.MMIO_GAP_START


@pytest.mark.parametrize("size_mib", [61, 100])
def test_initrd_too_large(tmp_path, mem, size_mib):
    p = tmp_path / "initrd"
    with open(p, "wb") as f:
        f.truncate(size_mib * MiB)
    with pytest.raises(LoaderError, match=rf"initrd \({size_mib} MiB\) does not fit in guest RAM"):
        load_initrd(mem, p, kernel=_kernel())


def test_initrd_empty_or_missing(tmp_path, mem):
    with pytest.raises(LoaderError, match="empty"):
        load_initrd(mem, write(tmp_path, b"", "initrd"), kernel=_kernel())
    with pytest.raises(LoaderError, match="cannot read initrd"):
        load_initrd(mem, tmp_path / "missing", kernel=_kernel())


# --- symbols ----------------------------------------------------------------------------
def test_symbols_from_system_map(tmp_path):
    p = write(tmp_path, b"ffffffff81000000 T _text\nffffffff81000000 T startup_64\n"
                        b"ffffffff81000100 t foo\nffffffff81000140 T bar\n"
                        b"ffffffff82000000 D some_data\nnonsense\n", "System.map")
    t = SymbolTable.from_system_map(p)
    assert t.lookup(0xFFFFFFFF8100011A) == "foo+0x1a/0x40"
    assert t.lookup(0xFFFFFFFF81000010) in ("startup_64+0x10/0x100", "_text+0x10/0x100")
    assert t.lookup(0xFFFFFFFF80000000) is None
    assert t.lookup(0xFFFFFFFF81000140) == "bar+0x0/0x0" or \
        t.lookup(0xFFFFFFFF81000140) is None
    with pytest.raises(LoaderError):
        SymbolTable.from_system_map(write(tmp_path, b"junk\n", "bad.map"))


def test_symbols_from_elf(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    src = write(tmp_path, b"void _start(void){for(;;);}\n"
                          b"int helper(int x){return x*3+1;}\n", "g.c")
    out = tmp_path / "g.elf"
    subprocess.run([gcc, "-O1", "-nostdlib", "-static", "-fno-pie", "-no-pie",
                    "-Wl,-Ttext=0x200000", "-o", str(out), str(src)], check=True)
    t = SymbolTable.from_elf(out)
    nm = subprocess.run(["nm", str(out)], capture_output=True, text=True, check=True).stdout
    helper = int(next(line.split()[0] for line in nm.splitlines() if line.endswith(" helper")), 16)
    assert t.lookup(helper + 1).startswith("helper+0x1/")
    assert SymbolTable.from_elf(out.read_bytes()).lookup(helper).startswith("helper+0x0/")
    with GuestMemory(16 * MiB) as m:
        k = load_kernel(m, out)
        assert k.kind == "elf" and k.symbols is not None
        assert k.symbols.lookup(helper).startswith("helper")
    with pytest.raises(LoaderError, match="no .symtab"):
        stripped = tmp_path / "s.elf"
        subprocess.run(["strip", "-o", str(stripped), str(out)], check=True)
        SymbolTable.from_elf(stripped)


def test_lzo_payload_has_no_host_decoder_and_falls_back(tmp_path, mem):
    img = make_bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(100))
    k = load_kernel(mem, write(tmp_path, img))
    assert k.kind == "bzimage" and k.codec == "lzo" and "no host-side" in k.fallback_reason
