"""Snapshot and restore of whole machines on tiny guests (vmm.snapshot.persist):
a guest saved mid-way through its counting loop continues after restore in a new VM,
two restores of one snapshot run independently, and snapshots that do not fit are
refused with one line before any VM is built."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from vmm.config import ExitReason, MachineConfig
from vmm.machine import Machine
from vmm.snapshot import persist
from vmm.snapshot.format import SnapshotError

pytestmark = requires_kvm

COUNT, STEP = 3000, 50          # guests/tiny/counter.S: 60 dots at the PIT's 100 Hz


def boot_and_snapshot(tiny, directory, loop="shim", dots_before=10):
    """Run counter.S until it printed ``dots_before`` dots, then save and end."""
    out = bytearray()
    seen = threading.Event()

    def console(data):
        out.extend(data)
        if out.count(b".") >= dots_before:
            seen.set()

    cfg = MachineConfig(kernel=tiny("counter", {"COUNT": COUNT, "STEP": STEP}),
                        mem_size=16 << 20, loop=loop, console=console)
    with Machine(cfg) as m:
        infos = []

        def saver():
            if seen.wait(60):
                infos.append(m.snapshot(str(directory), end=True))

        t = threading.Thread(target=saver)
        t.start()
        result = m.run(timeout=60)
        t.join()
    return result, bytes(out), infos


def restore_and_run(directory, loop="shim"):
    out = bytearray()
    snap, config = persist.load(str(directory), console=out.extend, loop=loop)
    with Machine(config, snapshot=snap) as m:
        result = m.run(timeout=60)
    return result, bytes(out)


@pytest.mark.parametrize("loop", ["shim", "python"])
def test_guest_continues_where_it_was_saved(tiny, tmp_path, loop):
    snap_dir = tmp_path / "snap"
    result, before, infos = boot_and_snapshot(tiny, snap_dir, loop)
    assert result.reason is ExitReason.SNAPSHOTTED and result.status == 0, result
    assert infos and infos[0].memory_stored < infos[0].memory_size
    assert b"done" not in before
    result, after = restore_and_run(snap_dir, loop)
    # counter.S exits 0 only if its registers (r12, r13) agree with its memory, the count
    # reached COUNT and _start ran once: restored, not restarted.
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), (result, after)
    assert b"start" not in after and after.endswith(b"done\n")
    dots = before.count(b".") + after.count(b".")
    # The dot being printed at the pause may be seen on both sides or on neither.
    assert abs(dots - COUNT // STEP) <= 1, (before, after)
    assert after.count(b".") < COUNT // STEP


def test_two_restores_of_one_snapshot_run_independently(tiny, tmp_path):
    snap_dir = tmp_path / "snap"
    boot_and_snapshot(tiny, snap_dir)
    before = (snap_dir / "memory").read_bytes()
    results = [None, None]

    def one(i):
        results[i] = restore_and_run(snap_dir)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result, out in results:
        assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), out
    assert (snap_dir / "memory").read_bytes() == before      # MAP_PRIVATE: never written


def test_snapshot_into_an_existing_directory_is_refused_and_the_vm_goes_on(tiny, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("mine")
    cfg = MachineConfig(kernel=tiny("counter", {"COUNT": COUNT, "STEP": STEP}),
                        mem_size=16 << 20)
    errors = []
    with Machine(cfg) as m:
        def saver():
            time.sleep(0.1)
            try:
                m.snapshot(str(taken))
            except SnapshotError as e:
                errors.append(str(e))

        t = threading.Thread(target=saver)
        t.start()
        result = m.run(timeout=60)
        t.join()
    assert result.status == 0                                 # ran to its end
    assert len(errors) == 1 and "\n" not in errors[0]
    assert os.listdir(taken) == ["file"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]   # no temporary left


@pytest.mark.parametrize("damage", ["state", "memory", "missing", "version"])
def test_damaged_or_foreign_snapshots_are_refused_before_a_vm_is_built(tiny, tmp_path,
                                                                       damage, monkeypatch):
    snap_dir = tmp_path / "snap"
    boot_and_snapshot(tiny, snap_dir)
    if damage == "state":
        p = snap_dir / "state.json"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    elif damage == "memory":
        with open(snap_dir / "memory", "r+b") as f:
            f.truncate(os.path.getsize(snap_dir / "memory") - 4096)
    elif damage == "missing":
        os.unlink(snap_dir / "state.json")
    elif damage == "version":               # a snapshot of another pyvmm version
        monkeypatch.setattr(persist, "__version__", "0.0.0-other")
    built = []
    monkeypatch.setattr(Machine, "_build", lambda self: built.append(1))
    with pytest.raises(SnapshotError) as e:
        persist.load(str(snap_dir))
    assert "\n" not in str(e.value) and str(snap_dir) in str(e.value)
    assert not built
