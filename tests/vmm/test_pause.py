"""Machine.pause()/resume() on tiny guests: the VM stops with nothing half done and goes
on exactly where it was (no port write lost or repeated), under both run loops."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import requires_kvm
from vmm.config import ExitReason, MachineConfig
from vmm.machine import Machine

pytestmark = [requires_kvm, pytest.mark.parametrize("loop", ["shim", "python"])]

COUNT = 60_000


def test_pause_resume_loses_and_repeats_nothing(tiny, loop):
    got = [0]
    cfg = MachineConfig(kernel=tiny("bench_exits", {"COUNT": COUNT}), mem_size=16 << 20,
                        loop=loop, console=lambda d: got.__setitem__(0, got[0] + len(d)))
    with Machine(cfg) as m:
        pauses = []

        def pauser():
            while len(pauses) < 5 and not m.stopping:
                time.sleep(0.02)
                if not m.pause():
                    return
                before = got[0]
                time.sleep(0.05)          # the console thread drains what was written
                frozen = got[0]
                time.sleep(0.05)
                pauses.append((before, frozen, got[0]))
                m.resume()

        t = threading.Thread(target=pauser)
        t.start()
        result = m.run(timeout=120)
        t.join()
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 0), result
    assert got[0] == COUNT                     # every write seen exactly once
    assert pauses, "the guest ended before it could be paused"
    for before, frozen, after in pauses:       # nothing ran while paused
        assert frozen == after
        assert 0 < after < COUNT


def test_pause_after_the_end_is_refused(tiny, loop):
    with Machine(MachineConfig(kernel=tiny("hello"), mem_size=16 << 20, loop=loop)) as m:
        assert not m.pause()                   # not started yet
        assert m.run(timeout=20).status == 0
        assert not m.pause()                   # ended
        assert not m.paused


def test_stop_while_paused_ends_the_vm(tiny, loop):
    with Machine(MachineConfig(kernel=tiny("halt_forever"), mem_size=16 << 20, loop=loop)) as m:
        def stopper():
            time.sleep(0.2)
            assert m.pause()
            m.stop()

        t = threading.Thread(target=stopper)
        t.start()
        result = m.run(timeout=30)
        t.join()
    assert result.reason is ExitReason.STOPPED and "request" in result.detail
