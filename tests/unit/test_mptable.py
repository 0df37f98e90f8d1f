"""The MP table read back by an independent parser written from the MP spec 1.4."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.arch.x86_64 import layout, mptable
from vmm.memory import GuestMemory

# Entry lengths by type (MP spec 1.4, table 4-3).
ENTRY_SIZE = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(mem: GuestMemory) -> dict:
    """Find the floating pointer the way Linux does (scan the EBDA's first KiB on 16-byte
    boundaries), check both checksums and return the decoded table."""
    ebda = mem.read(layout.EBDA_START, 1024)
    for off in range(0, 1024, 16):
        if ebda[off:off + 4] == b"_MP_":
            break
    else:
        raise AssertionError("no _MP_ floating pointer in the EBDA")
    mpf = ebda[off:off + 16]
    assert sum(mpf) % 256 == 0, "floating pointer checksum"
    physptr, length, rev, _csum, feat1, feat2 = struct.unpack_from("<IBBBBB", mpf, 4)
    assert (length, rev, feat1, feat2 & 0x80) == (1, 4, 0, 0)

    hdr = mem.read(physptr, 44)
    assert hdr[:4] == b"PCMP"
    base_len, spec = struct.unpack_from("<HB", hdr, 4)
    count, lapic, ext_len = struct.unpack_from("<HIH", hdr, 34)
    table = mem.read(physptr, base_len)
    assert sum(table) % 256 == 0, "configuration table checksum"

    entries, pos = [], 44
    for _ in range(count):
        kind = table[pos]
        size = ENTRY_SIZE[kind]
        raw = table[pos:pos + size]
        if kind == 0:
            _, apic_id, ver, flags, sig, feat = struct.unpack_from("<BBBBII", raw)
            entries.append(("cpu", apic_id, ver, flags, sig, feat))
        elif kind == 1:
            entries.append(("bus", raw[1], raw[2:8]))
        elif kind == 2:
            _, ioapic_id, ver, flags, addr = struct.unpack("<BBBBI", raw)
            entries.append(("ioapic", ioapic_id, ver, flags, addr))
        else:
            _, itype, iflags, bus, bus_irq, dst, pin = struct.unpack("<BBHBBBB", raw)
            entries.append(("int" if kind == 3 else "lint", itype, iflags, bus, bus_irq, dst, pin))
        pos += size
    assert pos == base_len, "entry count and table length disagree"
    return dict(physptr=physptr, spec=spec, lapic=lapic, ext_len=ext_len, entries=entries,
                end=physptr + base_len)


def written(cpu_count: int) -> dict:
    with GuestMemory(8 << 20) as mem:
        mptable.write_mptable(mem, cpu_count)
        return parse(mem)


def check(t: dict, n: int) -> None:
    kinds = [e[0] for e in t["entries"]]
    # Section 4.3: entries sorted by type.
    assert kinds == ["cpu"] * n + ["bus", "ioapic"] + ["int"] * 16 + ["lint"] * 2
    assert t["spec"] == 4 and t["lapic"] == layout.LAPIC_START and t["ext_len"] == 0
    assert t["end"] <= layout.LOW_RAM_END
    cpus = [e for e in t["entries"] if e[0] == "cpu"]
    assert [c[1] for c in cpus] == list(range(n))              # APIC ID = vCPU index
    assert [c[3] for c in cpus] == [0b11] + [0b01] * (n - 1)   # EN everywhere, BP on 0 only
    (ioapic,) = [e for e in t["entries"] if e[0] == "ioapic"]
    assert ioapic == ("ioapic", n, 0x11, 1, layout.IOAPIC_START)
    assert ioapic[1] not in {c[1] for c in cpus}
    (bus,) = [e for e in t["entries"] if e[0] == "bus"]
    assert bus == ("bus", 0, b"ISA   ")
    ints = [e for e in t["entries"] if e[0] == "int"]
    # ISA IRQ n -> I/O APIC pin n, vectored (mp_INT), conforming polarity/trigger.
    assert ints == [("int", 0, 0, 0, irq, n, irq) for irq in range(16)]
    lints = [e for e in t["entries"] if e[0] == "lint"]
    assert lints == [("lint", 3, 0, 0, 0, 0xFF, 0), ("lint", 1, 0, 0, 0, 0xFF, 1)]


@pytest.mark.parametrize("n", [1, 2, 4, mptable.MAX_CPUS])
def test_table_for_cpu_counts(n):
    t = written(n)
    check(t, n)
    assert t["physptr"] == layout.EBDA_START + 16


def test_irq0_goes_to_pin0_matching_kvm_default_routing():
    ints = [e for e in written(2)["entries"] if e[0] == "int"]
    assert [e for e in ints if e[4] == 0] == [("int", 0, 0, 0, 0, 2, 0)]
    assert not [e for e in ints if e[1] == 3], "no ExtINT I/O interrupt entry"


def test_max_cpus_is_what_fits_below_low_ram_end():
    assert layout.EBDA_START + mptable.table_size(mptable.MAX_CPUS) <= layout.LOW_RAM_END
    assert layout.EBDA_START + mptable.table_size(mptable.MAX_CPUS + 1) > layout.LOW_RAM_END
    assert mptable.MAX_CPUS <= 254


@pytest.mark.parametrize("n", [0, -1, mptable.MAX_CPUS + 1, 255])
def test_rejects_bad_cpu_counts(n):
    with GuestMemory(8 << 20) as mem:
        with pytest.raises(ValueError, match="vCPUs"):
            mptable.write_mptable(mem, n)
        assert mem.read(layout.EBDA_START, 1024) == bytes(1024)   # nothing written


def test_writes_only_inside_its_window():
    with GuestMemory(8 << 20) as mem:
        mem.write(layout.EBDA_START - 16, b"\xaa" * 16)
        mem.write(layout.LOW_RAM_END, b"\xbb" * 16)
        mptable.write_mptable(mem, mptable.MAX_CPUS)
        assert mem.read(layout.EBDA_START - 16, 16) == b"\xaa" * 16
        assert mem.read(layout.LOW_RAM_END, 16) == b"\xbb" * 16


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=mptable.MAX_CPUS))
def test_any_cpu_count_parses_back(n):
    check(written(n), n)
