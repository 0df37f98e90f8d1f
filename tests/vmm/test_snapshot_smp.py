"""SMP guests restore (issue #11): every vCPU continues where it was saved.

guests/tiny/smp.S with ROUNDS: the BSP wakes the APs (INIT-SIPI-SIPI), then every CPU
runs ROUNDS rounds and prints "cpu <APIC ID> <k>" after round k, keeping k in a
register and in memory (a round checks they agree); the BSP waits for every AP's last
round and exits 0. The VM is snapshotted once every CPU has printed a few rounds and
none has finished, and restored in a new Machine: every CPU goes on from its own k (no
CPU restarts, none is lost, no AP is woken again) and the guest ends with status 0.
"""

from __future__ import annotations

import re
import threading

import pytest

from tests.conftest import requires_kvm
from tests.vmm.test_snapshot import restore_and_run
from vmm.config import ExitReason, MachineConfig
from vmm.machine import Machine
from vmm.snapshot import persist

pytestmark = requires_kvm

ROUNDS, STEP = 60, 20000            # ~30-50 ms a round per vCPU here
ROUNDS_BEFORE = 5                   # every CPU has printed this many when it is saved
LINE = re.compile(r"cpu (\d+) (\d+)")


def progress(out: bytes) -> dict[int, list[int]]:
    """The rounds each CPU reported, in order, from whole "cpu <id> <k>" lines (a last
    line without its newline is left out: "cpu 1 1" may be the start of "cpu 1 12")."""
    got: dict[int, list[int]] = {}
    for line in out.decode().split("\n")[:-1]:
        if m := LINE.fullmatch(line):
            got.setdefault(int(m[1]), []).append(int(m[2]))
    return got


def run_saving_when(cfg, seen, directory):
    """Run a VM of ``cfg``; once ``seen`` is set, save it to ``directory`` and end it."""
    with Machine(cfg) as m:
        def saver():
            if seen.wait(60):
                m.snapshot(str(directory), end=True)

        t = threading.Thread(target=saver)
        t.start()
        try:
            return m.run(timeout=60)
        finally:
            seen.set()
            t.join()


def boot_and_snapshot(tiny, directory, cpus, loop):
    out = bytearray()
    seen = threading.Event()

    def console(data):
        out.extend(data)
        if b"\n" not in data:
            return
        counts = progress(bytes(out))
        if len(counts) == cpus and all(len(k) >= ROUNDS_BEFORE for k in counts.values()):
            seen.set()

    cfg = MachineConfig(kernel=tiny("smp", {"CPUS": cpus, "ROUNDS": ROUNDS, "STEP": STEP}),
                        mem_size=64 << 20, cpus=cpus, loop=loop, console=console)
    return run_saving_when(cfg, seen, directory), bytes(out)


@pytest.mark.parametrize("loop", ["shim", "python"])
@pytest.mark.parametrize("cpus", [2, 4])
def test_every_vcpu_continues_after_restore(tiny, tmp_path, cpus, loop):
    snap_dir = tmp_path / "snap"
    result, before = boot_and_snapshot(tiny, snap_dir, cpus, loop)
    assert (result.reason, result.status) == (ExitReason.SNAPSHOTTED, 0), (result, before)
    assert b"done" not in before
    saved = progress(before)
    assert sorted(saved) == list(range(cpus)), before
    assert all(ROUNDS_BEFORE <= len(k) < ROUNDS for k in saved.values()), saved

    result, after = restore_and_run(snap_dir, loop)
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), (result, after[-400:])
    assert b" up\n" not in after                  # restored, not booted again
    assert after.endswith(f"all {cpus} cpus done\n".encode()), after[-200:]
    resumed = progress(after)
    # Every CPU printed rounds after the restore, and they continue its own count:
    # together with what it printed before, each k from 1 to ROUNDS exactly once. (A
    # line the pause split in two, "cpu 1 " | "7\n", is whole in before + after.)
    assert sorted(resumed) == list(range(cpus)), after[-400:]
    whole = progress(before + after)
    for cpu in range(cpus):
        assert resumed[cpu][0] > saved[cpu][0], (cpu, saved[cpu], resumed[cpu])
        assert whole[cpu] == list(range(1, ROUNDS + 1)), (cpu, whole[cpu])


@pytest.mark.parametrize("loop", ["shim", "python"])
@pytest.mark.parametrize("cpus", [2, 4])
def test_aps_not_started_at_snapshot_start_after_restore(tiny, tmp_path, cpus, loop):
    # WAIT_INPUT: the BSP waits for a COM1 byte before INIT-SIPI-SIPI, so the VM is saved
    # with its APs in KVM's wait-for-SIPI state; the byte is typed into the restored VM.
    snap_dir = tmp_path / "snap"
    out = bytearray()
    seen = threading.Event()

    def console(data):
        out.extend(data)
        if b"cpu 0 up\n" in out:
            seen.set()

    kernel = tiny("smp", {"CPUS": cpus, "ROUNDS": 3, "STEP": STEP, "WAIT_INPUT": 1})
    cfg = MachineConfig(kernel=kernel, mem_size=64 << 20, cpus=cpus, loop=loop,
                        console=console)
    result = run_saving_when(cfg, seen, snap_dir)
    assert (result.reason, result.status) == (ExitReason.SNAPSHOTTED, 0), (result, out)
    assert bytes(out) == b"cpu 0 up\n"

    after = bytearray()
    snap, config = persist.load(str(snap_dir), console=after.extend, loop=loop)
    with Machine(config, snapshot=snap) as m:
        assert m.serial.enqueue_input(b"g") == 1
        result = m.run(timeout=60)
    lines = bytes(after).decode().splitlines()
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), (result, lines)
    assert sorted(line for line in lines if line.endswith(" up")) == \
        sorted([f"cpu {k} up" for k in range(1, cpus)] + [f"all {cpus} cpus up"]), lines
    got = progress(bytes(after))
    assert got == {k: [1, 2, 3] for k in range(cpus)}, lines
    assert lines[-1] == f"all {cpus} cpus done"
