"""The snapshot directory format (vmm/snapshot/format.py): round trip and every refusal."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from vmm.memory import GuestMemory
from vmm.snapshot import (FORMAT, VERSION, SnapshotError, data_extents, read_snapshot,
                          write_snapshot)

STATE = {
    "vcpus": [{"regs": {"rip": 0xFFFF_FFFF_8100_0000, "rflags": 2},
               "xsave": bytes(range(256)) * 16, "msrs": [[0x10, 1 << 63], [0xC0000080, 0xD01]]}],
    "devices": {"uart": {"ier": 5, "fifo": b"", "name": "ttyS0", "on": True, "x": None},
                "blk": {"queues": [[1, 2, [3, b"\xff"]], []], "ratio": 0.25}},
    "empty": {},
}
DEPS = {"cpu_profile": "safe", "vcpus": 1, "mem_size": 8 << 20, "quirks": ["fwait"]}
MEM = 8 << 20


@pytest.fixture
def mem():
    with GuestMemory(MEM) as m:
        m.write(0x1000, b"page one")
        m.write(0x40_0000, b"\xcc" * 5000)           # two pages
        m.write(MEM - 1, b"\x01")
        yield m


@pytest.fixture
def snap(tmp_path, mem):
    """A written snapshot directory with one extra file."""
    d = tmp_path / "snap"
    write_snapshot(str(d), state=STATE, memory=mem, deps=DEPS,
                   files={"disk0.overlay": lambda p: _write(p, b"overlay data" * 100)})
    return d


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_state(d, change) -> None:
    """Edit state.json and fix its checksum, the way a newer writer would have."""
    from vmm.snapshot.format import _canonical
    doc = json.loads((d / "state.json").read_text())
    change(doc)
    doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
    (d / "state.json").write_text(json.dumps(doc))


def _siblings(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path))


# -- round trip -------------------------------------------------------------------------

def test_round_trip(snap, mem):
    s = read_snapshot(str(snap), expect_deps={"cpu_profile": "safe", "vcpus": 1})
    assert s.state == STATE
    assert type(s.state["vcpus"][0]["xsave"]) is bytes
    assert s.deps == DEPS
    assert s.memory_size == MEM and s.memory_stored == 4 * 4096
    assert s.memory_path == str(snap / "memory")
    assert s.files == {"disk0.overlay": 1200}
    assert open(s.path("disk0.overlay"), "rb").read() == b"overlay data" * 100
    with pytest.raises(SnapshotError, match="has no file 'nope'"):
        s.path("nope")
    with GuestMemory.from_file(s.memory_path, s.memory_size) as restored:
        assert bytes(restored.host_view) == bytes(mem.host_view)


def test_layout_of_state_json(snap):
    doc = json.loads((snap / "state.json").read_text())
    assert set(doc) == {"format", "version", "created", "deps", "memory", "files", "state", "sha256"}
    assert (doc["format"], doc["version"]) == (FORMAT, VERSION) == ("pyvmm-snapshot", 1)
    assert doc["memory"]["size"] == MEM and doc["memory"]["stored"] == 4 * 4096
    assert doc["memory"]["extents"] == len(data_extents(str(snap / "memory"))) == 3
    assert doc["files"]["disk0.overlay"] == {
        "size": 1200, "sha256": hashlib.sha256(b"overlay data" * 100).hexdigest()}
    assert doc["state"]["devices"]["blk"]["queues"][0][2][1] == {"$b64": "/w=="}
    assert sorted(os.listdir(snap)) == ["disk0.overlay", "memory", "state.json"]


def test_write_reports_what_it_wrote(tmp_path, mem):
    info = write_snapshot(str(tmp_path / "s"), state={}, memory=mem, deps={})
    assert info.directory == str(tmp_path / "s")
    assert (info.memory_size, info.memory_stored, info.files_bytes) == (MEM, 4 * 4096, 0)
    assert info.state_bytes == os.path.getsize(tmp_path / "s" / "state.json")
    assert 0 <= info.memory_s <= info.total_s and info.files_s >= 0
    assert os.stat(tmp_path / "s" / "memory").st_blocks * 512 < MEM // 16


def test_an_existing_empty_directory_is_used(tmp_path, mem):
    (tmp_path / "s").mkdir()
    write_snapshot(str(tmp_path / "s"), state={"a": 1}, memory=mem, deps={})
    assert read_snapshot(str(tmp_path / "s")).state == {"a": 1}
    assert _siblings(tmp_path) == ["s"]


# -- refused on write -------------------------------------------------------------------

def test_an_existing_non_empty_directory_is_refused(tmp_path, mem):
    d = tmp_path / "s"
    d.mkdir()
    (d / "keep").write_text("mine")
    class Unsaved:                          # refused before RAM is written, not after
        size = MEM

        def save_to(self, path):
            raise AssertionError("memory saved before the directory was checked")
    with pytest.raises(SnapshotError, match=r"s exists; remove it or choose another directory$"):
        write_snapshot(str(d), state={}, memory=Unsaved(), deps={})
    assert os.listdir(d) == ["keep"] and _siblings(tmp_path) == ["s"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(SnapshotError, match="f exists"):
        write_snapshot(str(tmp_path / "f"), state={}, memory=mem, deps={})


@pytest.mark.parametrize("state,where", [
    ({"regs": (1, 2)}, r"state\['regs'\] is a tuple"),
    ({"a": [1, {"b": object()}]}, r"state\['a'\]\[1\]\['b'\] is a object"),
    ({"f": float("nan")}, r"state\['f'\] is nan"),
    ({"f": [float("inf")]}, r"state\['f'\]\[0\] is inf"),
    ({1: "x"}, r"state has the key 1"),
    ({"d": {"$b64": "x"}}, r"state\['d'\] has the key '\$b64'"),
    ({"s": {1, 2}}, r"state\['s'\] is a set"),
])
def test_non_plain_state_is_refused_naming_where(tmp_path, mem, state, where):
    with pytest.raises(TypeError, match=where):
        write_snapshot(str(tmp_path / "s"), state=state, memory=mem, deps={})
    assert _siblings(tmp_path) == []


def test_a_failure_half_way_leaves_nothing(tmp_path, mem):
    def half(path):
        _write(path, b"partial")
        raise RuntimeError("disk backend failed")
    with pytest.raises(RuntimeError, match="disk backend failed"):
        write_snapshot(str(tmp_path / "s"), state=STATE, memory=mem, deps=DEPS,
                       files={"a": lambda p: _write(p, b"ok"), "b": half})
    assert _siblings(tmp_path) == []


def test_an_os_error_half_way_is_one_line_and_leaves_nothing(tmp_path, mem):
    def fail(path):
        raise OSError(28, "No space left on device", path)
    with pytest.raises(SnapshotError, match=r"^cannot write snapshot .*: No space left on device$"):
        write_snapshot(str(tmp_path / "s"), state={}, memory=mem, deps={}, files={"x": fail})
    assert _siblings(tmp_path) == []


def test_a_files_callable_that_writes_nothing_is_refused(tmp_path, mem):
    with pytest.raises(SnapshotError, match="'x' was not written"):
        write_snapshot(str(tmp_path / "s"), state={}, memory=mem, deps={}, files={"x": lambda p: None})
    assert _siblings(tmp_path) == []


@pytest.mark.parametrize("name", ["memory", "state.json", "../up", "a/b", ".hidden", ""])
def test_unusable_file_names_are_refused(tmp_path, mem, name):
    with pytest.raises(SnapshotError, match="unusable"):
        write_snapshot(str(tmp_path / "s"), state={}, memory=mem, deps={},
                       files={name: lambda p: _write(p, b"x")})
    assert _siblings(tmp_path) == []


def test_a_missing_parent_is_one_line(tmp_path, mem):
    with pytest.raises(SnapshotError, match="does not exist"):
        write_snapshot(str(tmp_path / "no" / "s"), state={}, memory=mem, deps={})


# -- refused on read --------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(SnapshotError, match=r"^snapshot .*/nothing does not exist$"):
        read_snapshot(str(tmp_path / "nothing"))


def test_missing_state_json(snap):
    (snap / "state.json").unlink()
    with pytest.raises(SnapshotError, match=r"is not a pyvmm snapshot \(it has no state.json\)"):
        read_snapshot(str(snap))


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"format": "other"}'])
def test_garbage_state_json(snap, garbage):
    (snap / "state.json").write_bytes(garbage)
    with pytest.raises(SnapshotError, match=r"state.json is (corrupted \(not valid JSON|not a pyvmm)") as e:
        read_snapshot(str(snap))
    assert "\n" not in str(e.value)


def test_a_flipped_byte_fails_the_checksum(snap):
    text = (snap / "state.json").read_bytes()
    _flip(snap / "state.json", text.index(b'"ier": 5') + 7)       # 5 -> 4: still JSON
    with pytest.raises(SnapshotError, match=r"state.json is corrupted \(checksum mismatch\)$"):
        read_snapshot(str(snap))


def test_a_flipped_byte_in_the_checksum_itself(snap):
    text = (snap / "state.json").read_bytes()
    _flip(snap / "state.json", text.index(b'"sha256": "', text.index(b'"format"')) + 12)
    with pytest.raises(SnapshotError, match=r"checksum mismatch"):
        read_snapshot(str(snap))


def test_a_newer_version_is_refused(snap):
    _rewrite_state(snap, lambda doc: doc.update(version=VERSION + 1))
    with pytest.raises(SnapshotError, match=rf"^snapshot {snap} was written by a newer pyvmm \(format 2\)"):
        read_snapshot(str(snap))


def test_a_well_checksummed_but_malformed_state_is_refused(snap):
    _rewrite_state(snap, lambda doc: doc["memory"].update(size="big"))
    with pytest.raises(SnapshotError, match=r"is malformed \(memory.size\)"):
        read_snapshot(str(snap))


def test_memory_missing(snap):
    (snap / "memory").unlink()
    with pytest.raises(SnapshotError, match=r"memory is missing$"):
        read_snapshot(str(snap))


def test_memory_truncated_by_one_page(snap):
    os.truncate(snap / "memory", MEM - 4096)
    with pytest.raises(SnapshotError, match=rf"memory is truncated \({MEM - 4096} of {MEM} bytes\)"):
        read_snapshot(str(snap))


def test_memory_truncated_and_extended_again(snap):
    os.truncate(snap / "memory", 0x40_0000)          # drops the pages at 4 MiB and the end
    os.truncate(snap / "memory", MEM)
    with pytest.raises(SnapshotError, match=r"data extents differ: 3 recorded, 1 found"):
        read_snapshot(str(snap))


def test_memory_replaced_by_a_file_of_the_right_size(snap):
    os.unlink(snap / "memory")
    with open(snap / "memory", "wb") as f:           # same size, data elsewhere
        f.write(b"x" * 4096)
        f.truncate(MEM)
    with pytest.raises(SnapshotError, match="is not the file that was saved"):
        read_snapshot(str(snap))


def test_memory_copied_with_its_holes_is_accepted(snap, tmp_path):
    """cp --sparse=always makes holes of exactly the zero pages: the same extents."""
    import shutil
    import subprocess
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("state.json", "disk0.overlay"):
        shutil.copy(snap / name, copy / name)
    subprocess.run(["cp", "--sparse=always", str(snap / "memory"), str(copy / "memory")], check=True)
    assert read_snapshot(str(copy)).memory_size == MEM


def test_an_extra_file_with_a_changed_byte(snap):
    _flip(snap / "disk0.overlay", 7)
    with pytest.raises(SnapshotError, match=r"disk0.overlay is corrupted \(sha256 mismatch\)$"):
        read_snapshot(str(snap))


def test_an_extra_file_with_another_size(snap):
    with open(snap / "disk0.overlay", "ab") as f:
        f.write(b"+")
    with pytest.raises(SnapshotError, match=r"disk0.overlay has 1201 bytes; the snapshot recorded 1200"):
        read_snapshot(str(snap))


def test_an_extra_file_missing(snap):
    (snap / "disk0.overlay").unlink()
    with pytest.raises(SnapshotError, match=r"disk0.overlay is missing$"):
        read_snapshot(str(snap))


def test_a_dep_mismatch_names_the_first_differing_key(snap):
    with pytest.raises(SnapshotError, match=(rf"^snapshot {snap} was made with cpu_profile 'safe'; "
                                             r"this VM has 'host'$")):
        read_snapshot(str(snap), expect_deps={"vcpus": 1, "cpu_profile": "host", "mem_size": 1})
    with pytest.raises(SnapshotError, match=r"made with quirks \['fwait'\]; this VM has \[\]"):
        read_snapshot(str(snap), expect_deps={"quirks": []})
    with pytest.raises(SnapshotError, match=r"records no kernel; this VM has 'abc'"):
        read_snapshot(str(snap), expect_deps={"kernel": "abc"})
    assert read_snapshot(str(snap), expect_deps={"quirks": ["fwait"], "mem_size": MEM}).deps == DEPS


def test_no_error_message_spans_lines(snap):
    """SnapshotError is a UserError: the CLI prints it as one line."""
    from vmm.errors import UserError
    (snap / "memory").unlink()
    with pytest.raises(UserError) as e:
        read_snapshot(str(snap))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["state.json", "disk0.overlay", "memory"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(snap, name):
    (snap / name).unlink()
    os.mkfifo(snap / name)
    with pytest.raises(SnapshotError, match=rf"{name} is not a regular file$"):
        read_snapshot(str(snap))
