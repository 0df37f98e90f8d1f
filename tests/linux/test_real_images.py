"""The kernel loader on the real default-guest kernel, in every payload compression.

No boots: these load the cached bzImages (vmm.guestbuild.build_kernel) into guest
memory and compare with the vmlinux of the same build, so they take seconds once the
kernels are cached (the first build of a compression variant re-links in ~15 s; the very
first kernel build takes minutes).
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from vmm.guestbuild import GuestBuildError
from vmm.loader import LoaderError, load_kernel
from vmm.memory import GuestMemory

pytestmark = [pytest.mark.linux, pytest.mark.timeout(900)]

MiB = 1 << 20
MEM_SIZE = 256 * MiB
COMPRESSIONS = ("gzip", "bzip2", "lzma", "xz", "lz4", "zstd")


@pytest.fixture(scope="module")
def kernels(guest_build_prerequisites):
    """{compression: KernelBuild}, built once (or taken from the cache)."""
    from vmm.guestbuild import build_kernel

    builds = {}
    for c in COMPRESSIONS:
        try:
            builds[c] = build_kernel(c)
        except GuestBuildError as e:
            pytest.fail(f"building the {c} kernel failed: {e}")
    return builds


def _reference(vmlinux):
    """What loading a vmlinux directly puts in guest memory: (LoadedKernel, the loaded
    range's sha256, the whole memory's sha256). (Each compression variant has its own
    vmlinux: re-linking bumps the build number in the version banner.)"""
    with GuestMemory(MEM_SIZE) as mem:
        k = load_kernel(mem, vmlinux)
        assert k.kind == "elf" and k.setup_header is None
        assert k.load_end > k.entry
        return k, _range_digest(mem, k), _memory_digest(mem)


def _range_digest(mem: GuestMemory, k) -> str:
    return hashlib.sha256(mem.view(k.entry, k.load_end - k.entry)).hexdigest()


def _memory_digest(mem: GuestMemory) -> str:
    h = hashlib.sha256()
    for r in mem.regions:
        h.update(mem.view(r.guest_addr, r.end - r.guest_addr))
    return h.hexdigest()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("mode", ["auto", "elf"])
def test_bzimage_decompressed_on_host_equals_vmlinux(kernels, compression, mode):
    ref, ref_range, ref_memory = _reference(kernels[compression].vmlinux)
    bz = kernels[compression].bzimage
    with GuestMemory(MEM_SIZE) as mem:
        k = load_kernel(mem, bz, mode=mode)
        assert k.kind == "elf"
        assert k.fallback_reason is None
        assert k.codec == compression
        assert (k.entry, k.load_end) == (ref.entry, ref.load_end)
        # The boot protocol header comes from the bzImage file, for the zero page.
        data = bz.read_bytes()
        assert k.setup_header == data[0x1F1:0x1F1 + len(k.setup_header)]
        assert k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
        assert _range_digest(mem, k) == ref_range
        assert _memory_digest(mem) == ref_memory


def _header(data: bytes) -> dict:
    setup_sects = data[0x1F1] or 4
    return {
        "setup_size": (setup_sects + 1) * 512,
        "kernel_alignment": struct.unpack_from("<I", data, 0x230)[0],
        "relocatable": data[0x234],
        "pref_address": struct.unpack_from("<Q", data, 0x258)[0],
        "init_size": struct.unpack_from("<I", data, 0x260)[0],
    }


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_forced_bzimage_mode_loads_protected_mode_kernel(kernels, compression):
    data = kernels[compression].bzimage.read_bytes()
    h = _header(data)
    # boot.rst: a relocatable kernel may go at pref_address (kernel_alignment-aligned);
    # a non-relocatable one (the default guest's tinyconfig) at 0x100000, and its
    # init_size counts from pref_address, where it moves itself.
    if h["relocatable"]:
        load_addr = runtime = h["pref_address"]
        assert load_addr % h["kernel_alignment"] == 0
    else:
        load_addr, runtime = 0x100000, h["pref_address"]
    with GuestMemory(MEM_SIZE) as mem:
        k = load_kernel(mem, kernels[compression].bzimage, mode="bzimage")
        assert k.kind == "bzimage"
        assert k.fallback_reason is None
        assert k.entry == load_addr + 0x200
        pm = data[h["setup_size"]:]
        assert mem.read(load_addr, len(pm)) == pm
        assert k.load_end >= max(load_addr + len(pm), runtime + h["init_size"])
        assert k.setup_header == data[0x1F1:0x1F1 + len(k.setup_header)]


# -- malformed copies of the real bzImage -------------------------------------------------

def _payload_range(data: bytes) -> tuple[int, int]:
    h = _header(data)
    off = h["setup_size"] + struct.unpack_from("<I", data, 0x248)[0]
    return off, off + struct.unpack_from("<I", data, 0x24C)[0]


def _truncations(data: bytes) -> dict[str, int]:
    setup = _header(data)["setup_size"]
    p0, p1 = _payload_range(data)
    return {
        "empty": 0,
        "boot-sector": 0x100,
        "mid-header": 0x220,
        "end-of-setup": setup,
        "payload-start": p0 + 64,
        "payload-middle": (p0 + p1) // 2,
        "payload-end": p1 - 8,
    }


def _tail_truncations(data: bytes) -> dict[str, int]:
    """Cuts after the payload: the decompressor's code behind it, or the trailing CRC."""
    p0, p1 = _payload_range(data)
    return {"after-payload": (p1 + len(data)) // 2, "last-byte": len(data) - 1}


def _load_outcome(path, mode: str):
    """Load and classify: "error: <msg>", "fallback: <reason>" or "loaded <kind>".
    Any exception other than LoaderError propagates (and fails the test)."""
    with GuestMemory(MEM_SIZE) as mem:
        try:
            k = load_kernel(mem, path, mode=mode)
        except LoaderError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"LoaderError message not one line: {msg!r}"
            assert str(path) in msg
            return f"error: {msg}"
        if k.fallback_reason:
            assert k.kind == "bzimage"
            return f"fallback: {k.fallback_reason}"
        return f"loaded {k.kind}"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_truncated_real_bzimage(kernels, compression, tmp_path):
    data = kernels[compression].bzimage.read_bytes()
    for where, n in _truncations(data).items():
        bad = tmp_path / f"bzImage-{where}"
        bad.write_bytes(data[:n])
        for mode in ("auto", "elf", "bzimage"):
            outcome = _load_outcome(bad, mode)
            # A truncated file cannot be a valid kernel: an error or (auto mode, if
            # the payload itself is intact) never a silent success.
            assert not outcome.startswith("loaded"), (where, mode, outcome)
            if mode == "elf":
                assert outcome.startswith("error"), (where, mode, outcome)
    # Cut behind the payload: host-side decompression still has everything it needs.
    for where, n in _tail_truncations(data).items():
        bad = tmp_path / f"bzImage-{where}"
        bad.write_bytes(data[:n])
        for mode in ("auto", "elf"):
            outcome = _load_outcome(bad, mode)
            assert outcome == "loaded elf" or outcome.startswith("error"), (where, mode)


@pytest.mark.parametrize("compression", ["gzip"])
def test_bzimage_mode_rejects_file_shorter_than_syssize(kernels, compression, tmp_path):
    data = kernels[compression].bzimage.read_bytes()
    syssize = struct.unpack_from("<I", data, 0x1F4)[0] * 16
    assert _header(data)["setup_size"] + syssize == len(data)
    bad = tmp_path / "bzImage-after-payload"
    bad.write_bytes(data[:_tail_truncations(data)["after-payload"]])
    outcome = _load_outcome(bad, "bzimage")
    assert outcome.startswith("error"), outcome


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_corrupted_real_payload(kernels, compression, tmp_path):
    data = bytearray(kernels[compression].bzimage.read_bytes())
    p0, p1 = _payload_range(bytes(data))
    # Damage the compressed stream past its header, in several places.
    for i in range(5):
        pos = p0 + 256 + (p1 - p0 - 512) * i // 5
        data[pos:pos + 64] = bytes(b ^ 0x5A for b in data[pos:pos + 64])
    bad = tmp_path / "bzImage-corrupt"
    bad.write_bytes(bytes(data))
    auto = _load_outcome(bad, "auto")
    assert auto.startswith("fallback: ") and len(auto) > len("fallback: "), auto
    elf = _load_outcome(bad, "elf")
    assert elf.startswith("error: ") and "decompress" in elf, elf
    # The in-guest decompressor path does not look at the payload.
    assert _load_outcome(bad, "bzimage") == "loaded bzimage"


@pytest.mark.parametrize("what,offset,value", [
    ("boot flag", 0x1FE, b"\x00\x00"),
    ("HdrS magic", 0x202, b"HdrZ"),
    ("old protocol", 0x206, b"\x00\x02"),
    ("payload length", 0x24C, b"\xff\xff\xff\x7f"),
    ("payload offset", 0x248, b"\xff\xff\xff\x7f"),
])
def test_corrupted_real_header(kernels, tmp_path, what, offset, value):
    data = bytearray(kernels["gzip"].bzimage.read_bytes())
    data[offset:offset + len(value)] = value
    bad = tmp_path / "bzImage-bad-header"
    bad.write_bytes(bytes(data))
    for mode in ("auto", "elf"):
        outcome = _load_outcome(bad, mode)
        assert outcome.startswith(("error", "fallback")), (what, mode, outcome)
        if mode == "elf":
            assert outcome.startswith("error"), (what, mode, outcome)
