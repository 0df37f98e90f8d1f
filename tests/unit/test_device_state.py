"""Device state for snapshot/restore: every stateful device's save() / restore(), and
the copy-on-write overlay's save_to() / reopen(). No VM.

Each device is driven into a non-trivial state through its register interface, saved,
and a freshly built twin is restored from the state. What must hold: the state is plain
data (it survives a JSON round trip with bytes as base64, as the snapshot format writes
it); saving the twin gives the same state; the twin answers the next operations exactly
as the original does (register reads, callbacks, the guest memory and disk a virtio
request leaves); a bad state is refused with a ValueError and leaves the device as it
was; a saved overlay reopens with the same contents and the snapshot's files are never
written again.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import struct

import pytest

from vmm.devices import cmos as cmos_mod
from vmm.devices import i8042 as kbc
from vmm.devices.cmos import Cmos
from vmm.devices.debugexit import DebugExit
from vmm.devices.i8042 import I8042
from vmm.devices.state import DeviceStateError
from vmm.devices.testdev import TestDevice
from vmm.devices.virtio import blk as B
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.queue import Queue, QueueStateError
from vmm.disk import DiskError, RawDisk, open_disk
from vmm.disk import overlay as O
from vmm.errors import UserError
from vmm.memory import GuestMemory

from .test_overlay import _overlay_fds
from .test_serial8250 import DATA, FCR, IER, IIR, LCR, LSR, MCR, MSR, SCR, Harness
from .test_virtio_blk import DISK_SECTORS, Env, pattern
from .test_virtio_mmio import MmioDriver
from .test_virtio_queue import DESC_ADDR, MEM_SIZE, Buffers, make_queue

OK = B.VIRTIO_BLK_S_OK


# --- plain data -----------------------------------------------------------------------
def _encode(x):
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    if isinstance(x, dict):
        assert all(type(k) is str for k in x), x
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    assert x is None or type(x) in (int, bool, str), f"not plain data: {x!r}"
    return x


def _decode(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return base64.b64decode(x["__bytes__"])
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def through_json(state: dict) -> dict:
    """What the snapshot format gives back for ``state``; equal only if it is plain data
    (a tuple would come back a list, an object not at all)."""
    back = _decode(json.loads(json.dumps(_encode(state))))
    assert back == state
    return back


def test_through_json_can_fail():
    with pytest.raises(AssertionError):
        through_json({"a": (1, 2)})
    with pytest.raises(AssertionError):
        through_json({"a": object()})


def refused(device, bad: dict, before: dict | None = None) -> None:
    """``device.restore(bad)`` raises a one-line ValueError and changes nothing."""
    before = device.save() if before is None else before
    with pytest.raises(ValueError) as e:
        device.restore(bad)
    assert isinstance(e.value, UserError)
    assert "\n" not in str(e.value)
    assert device.save() == before


def mutated(state: dict, **changes) -> dict:
    s = copy.deepcopy(state)
    for k, v in changes.items():
        if v is KeyError:
            del s[k]
        else:
            s[k] = v
    return s


# --- serial ----------------------------------------------------------------------------
def _busy_serial(fifo_size: int = 64) -> Harness:
    h = Harness(fifo_size)
    h.w(LCR, 0x83)  # DLAB, 8N1
    h.w(DATA, 0x34)
    h.w(IER, 0x12)  # DLM
    h.w(LCR, 0x1B)  # 8E1, DLAB off
    h.w(FCR, 0x01)  # FIFOs on
    h.w(IER, 0x07)  # RDA | THRI | RLSI: THRI pending at once
    h.w(SCR, 0x5A)
    h.w(MCR, 0x0B)
    h.uart.enqueue_input(b"hello, world")
    h.uart.enqueue_input(bytes(range(100)))  # overflows: OE
    return h


def _serial_reads(h: Harness) -> list:
    """Every register, in an order that sees each side effect (OE, THRI, the FIFO)."""
    out = [h.r(IIR), h.r(LSR), h.r(LSR), h.r(IIR)]
    out += [h.r(DATA) for _ in range(70)]
    out += [h.r(IIR), h.r(IIR), h.r(LSR), h.r(MSR), h.r(SCR), h.r(LCR), h.r(MCR), h.r(IER)]
    h.w(LCR, h.r(LCR) | 0x80)
    out += [h.r(DATA), h.r(IER)]
    h.w(LCR, h.r(LCR) & 0x7F)
    h.w(DATA, ord("x"))  # THR write with THRI enabled: output and a new edge
    out += [h.r(IIR), h.uart.fast_path_state(), h.irqs, bytes(h.out)]
    return out


def test_serial_round_trip():
    a = _busy_serial()
    state = a.uart.save()
    assert state["v"] == 1 and state["divisor"] == 0x1234 and state["overrun"]
    assert state["thri_pending"] and len(state["rx"]) == 64
    b = Harness()
    b.uart.restore(through_json(state))
    assert b.uart.save() == state
    assert b.changes == 1  # the fast path's view is resynced once
    assert b.irqs == 0  # restore raises nothing: the irqchip state has the edge
    a.irqs = 0
    a.out.clear()
    assert _serial_reads(b) == _serial_reads(a)


def test_serial_restore_resyncs_fast_path_view():
    a = Harness()
    a.w(LCR, 0x80)  # DLAB: the shim must not take THR writes
    b = Harness()
    assert b.uart.fast_path_state()[0]
    seen = []
    b.uart.on_state_change = lambda: seen.append(b.uart.fast_path_state())
    b.uart.restore(a.uart.save())
    assert seen == [(False, 0x60)]


def test_serial_loopback_and_fifo_state_kept():
    a = Harness(fifo_size=4)
    a.w(MCR, 0x10 | 0x0F)  # loopback, all modem lines
    a.w(DATA, 0x41)  # loops back into the receiver
    b = Harness(fifo_size=4)
    b.uart.restore(a.uart.save())
    assert b.r(MSR) == a.r(MSR) == 0xF0
    assert b.uart.input_space() == 0
    assert b.r(DATA) == a.r(DATA) == 0x41


@pytest.mark.parametrize("changes", [
    {"rx": bytes(65)},  # more than the FIFO holds
    {"rx": list(b"abc")},
    {"ier": 0x10},
    {"lcr": 256},
    {"lcr": "3"},
    {"lcr": True},
    {"mcr": 0x20},
    {"scr": -1},
    {"divisor": 0x10000},
    {"overrun": 1},
    {"thri_pending": True, "ier": 0x01},  # write() never leaves THRI pending then
    {"v": 2},
    {"v": KeyError},
    {"scr": KeyError},
    {"extra": 1},
])
def test_serial_bad_state_refused(changes):
    good = _busy_serial().uart.save()
    b = Harness()
    b.uart.restore(good)
    b.changes = 0
    refused(b.uart, mutated(good, **changes))
    assert b.changes == 0
    with pytest.raises(DeviceStateError):
        b.uart.restore([good])


# --- i8042 -----------------------------------------------------------------------------
def _kbc() -> tuple[I8042, list]:
    events = []
    return I8042(lambda: events.append("reset"), lambda: events.append("irq")), events


def _busy_kbc() -> I8042:
    k, _ = _kbc()
    k.write(kbc.COMMAND_OFFSET, 1, kbc.CMD_KBD_DISABLE)
    k.write(kbc.DATA_OFFSET, 1, 0xF2)  # identify: FA AB 83
    k.read(kbc.DATA_OFFSET, 1)
    k.write(kbc.COMMAND_OFFSET, 1, kbc.CMD_WRITE_OUTP)  # waits for its parameter
    return k


def _kbc_ops(k: I8042, events: list) -> list:
    out = [k.read(kbc.STATUS_OFFSET, 1), k.read(kbc.DATA_OFFSET, 1),
           k.read(kbc.STATUS_OFFSET, 1), k.read(kbc.DATA_OFFSET, 1),
           k.read(kbc.STATUS_OFFSET, 1)]
    k.write(kbc.DATA_OFFSET, 1, 0x03)  # the output port parameter
    for cmd in (kbc.CMD_READ_OUTP, kbc.CMD_READ_CTR):
        k.write(kbc.COMMAND_OFFSET, 1, cmd)
        out += [k.read(kbc.STATUS_OFFSET, 1), k.read(kbc.DATA_OFFSET, 1)]
    return out + [list(events)]


def test_i8042_round_trip():
    a = _busy_kbc()
    state = a.save()
    assert state["pending_cmd"] == kbc.CMD_WRITE_OUTP and state["out"] == b"\xab\x83"
    b, events = _kbc()
    b.restore(through_json(state))
    assert b.save() == state
    a_events: list = []
    a._interrupt = lambda: a_events.append("irq")
    assert _kbc_ops(b, events) == _kbc_ops(a, a_events)


@pytest.mark.parametrize("changes", [
    {"out": bytes(kbc.OUTPUT_QUEUE_SIZE + 1)},
    {"pending_cmd": kbc.CMD_READ_CTR},
    {"pending_cmd": "0x60"},
    {"status": kbc.STATUS_OBF_BIT | kbc.STATUS_SYS_BIT},
    {"ctr": 0x100},
    {"outp": None},
    {"v": 0},
])
def test_i8042_bad_state_refused(changes):
    b, _ = _kbc()
    refused(b, mutated(_busy_kbc().save(), **changes))


# --- CMOS ------------------------------------------------------------------------------
CLOCK = 1_700_000_000.5


def _busy_cmos() -> Cmos:
    c = Cmos(clock=lambda: CLOCK)
    for index, value in ((0x40, 0x99), (0x7F, 0x11), (cmos_mod.RTC_REG_B, 0x06),
                         (cmos_mod.RTC_SECONDS_ALARM, 0x30)):
        c.write(cmos_mod.INDEX_OFFSET, 1, index | 0x80)  # NMI mask bit: ignored
        c.write(cmos_mod.DATA_OFFSET, 1, value)
    c.write(cmos_mod.INDEX_OFFSET, 1, 0x41)
    return c


def _cmos_reads(c: Cmos) -> list:
    out = [c.read(cmos_mod.DATA_OFFSET, 1)]  # the selected index first
    for index in range(cmos_mod.CMOS_SIZE):
        c.write(cmos_mod.INDEX_OFFSET, 1, index)
        out.append(c.read(cmos_mod.DATA_OFFSET, 1))
    return out


def test_cmos_round_trip():
    a = _busy_cmos()
    state = a.save()
    assert state["index"] == 0x41 and len(state["ram"]) == 128
    b = Cmos(clock=lambda: CLOCK)
    b.restore(through_json(state))
    assert b.save() == state
    assert _cmos_reads(b) == _cmos_reads(a)
    assert _cmos_reads(b)[1 + 0x40] == 0x99


@pytest.mark.parametrize("changes", [
    {"ram": bytes(127)},
    {"ram": bytes(129)},
    {"ram": bytes(10) + b"\xa6" + bytes(117)},  # UIP in register A
    {"index": 0x80},
    {"index": -1},
    {"v": "1"},
])
def test_cmos_bad_state_refused(changes):
    refused(Cmos(), mutated(_busy_cmos().save(), **changes))


# --- debug exit and the test device ---------------------------------------------------
def test_debug_exit_state():
    exits = []
    d = DebugExit(exits.append)
    assert through_json(d.save()) == {"v": 1}
    d.restore({"v": 1})
    d.write(0, 1, 0x142)
    assert exits == [0x42]
    refused(d, {"v": 1, "status": 3})
    refused(d, {"v": 2})


def _busy_testdev() -> TestDevice:
    t = TestDevice()
    t.write(0x10, 8, 0x1122334455667788)
    t.write(0x4C, 4, 0xDEADBEEF)
    t.write(0x00, 4, 1)  # read-only ID: counted only
    return t


def test_testdev_round_trip():
    a = _busy_testdev()
    state = a.save()
    b = TestDevice()
    b.restore(through_json(state))
    assert b.save() == state
    assert b.writes == a.writes and b.writes[0] == (0x10, 8, 0x1122334455667788)
    for size in (1, 2, 4, 8):
        assert [b.read(o, size) for o in range(0x60)] == [a.read(o, size) for o in range(0x60)]


@pytest.mark.parametrize("changes", [
    {"scratch": bytes(63)},
    {"write_count": -1},
    {"write_count": 2},  # fewer writes than the log holds
    {"writes": [[0, 3]]},
    {"writes": [(0x10, 4, 1)]},
    {"writes": [[0x10, 16, 1], [0, 1, 0], [0, 1, 0]]},
])
def test_testdev_bad_state_refused(changes):
    refused(TestDevice(), mutated(_busy_testdev().save(), **changes))


# --- virtqueue -------------------------------------------------------------------------
@pytest.fixture
def mem():
    with GuestMemory(MEM_SIZE) as m:
        yield m


@pytest.fixture
def mem2():
    with GuestMemory(MEM_SIZE) as m:
        yield m


def test_queue_restore_keeps_ring_indexes(mem):
    q, rings = make_queue(mem, 8, event_idx=True)
    buf = Buffers(mem)
    for _ in range(11):  # wraps the 8-entry ring
        rings.publish(rings.chain([(buf.alloc(4), 4, True)]))
        c = q.pop()
        q.add_used(c.head_index, 4)
    rings.publish(rings.chain([(buf.alloc(4), 4, True)]))  # available, not popped
    q.needs_notification()
    state = q.save()
    assert state["next_avail"] == state["next_used"] == 11
    q2 = Queue(q.max_size)
    q2.restore(through_json(state), mem, activated=True, event_idx=True, indirect=True)
    assert q2.save() == state and q2.event_idx and q2.mem is mem
    assert q2.pending() == 1  # not reset to 0: that would make 12 pending
    c = q2.pop()
    assert c.head_index == rings.next_desc - 1


def test_queue_restore_before_activation(mem):
    q = Queue(256)
    q.size, q.desc_table = 64, DESC_ADDR
    state = q.save()
    q2 = Queue(256)
    q2.restore(state, mem, activated=False)
    assert q2.save() == state and q2.mem is None and q2.pop() is None
    with pytest.raises(QueueStateError):  # indexes of a never-activated queue
        q2.restore(mutated(state, next_avail=3), mem, activated=False)
    with pytest.raises(QueueStateError):
        q2.restore(state, mem, activated=True)  # not ready


# --- virtio-mmio + virtio-blk ------------------------------------------------------------
def _blk_request(env: Env, rtype: int, sector: int, out: bytes = b"", in_len: int = 0,
                 notify: bool = True) -> int:
    """Lay out one request in ``env``'s memory and publish it; returns the status addr."""
    hdr = struct.pack("<IIQ", rtype, 0, sector)
    bufs = [(env.buf.alloc(len(hdr), hdr), len(hdr), False)]
    if out:
        bufs.append((env.buf.alloc(len(out), out), len(out), False))
    if in_len:
        bufs.append((env.buf.alloc(in_len, b"\xee" * in_len), in_len, True))
    st = env.buf.alloc(1, b"\xff")
    bufs.append((st, 1, True))
    head = env.rings.chain(bufs)
    env.rings.publish(head)
    if notify:
        env.d.w(M.QUEUE_NOTIFY_OFFSET, 0)
    return st


class Twin:
    """A virtio-blk device rebuilt over a copy of ``env``'s memory and disk, the way a
    restore rebuilds it: a fresh device and transport, then ``restore``."""

    def __init__(self, env: Env, mem2: GuestMemory, disk2, **kw):
        mem2.write(0, env.mem.read(0, MEM_SIZE))
        self.mem = mem2
        self.irqs: list = []
        self.dev = B.VirtioBlk(disk2, **kw)
        self.t = M.VirtioMmioTransport(self.dev, mem2, lambda: self.irqs.append(1))
        self.d = MmioDriver(self.t, mem2)
        self.rings = copy.copy(env.rings)
        self.rings.mem = mem2
        self.buf = copy.copy(env.buf)
        self.buf.mem = mem2

    def close(self):
        self.dev.close()


@pytest.fixture
def blk(tmp_path, mem):
    disk = tmp_path / "disk.img"
    disk.write_bytes(pattern(DISK_SECTORS * 512))
    env = Env(disk, mem, serial="original")
    yield env, disk
    env.close()


def _busy_blk(env: Env) -> None:
    for i in range(20):  # wraps the 16-entry ring
        _blk_request(env, B.VIRTIO_BLK_T_OUT, 8 * i, pattern(1024, seed=i))
        _blk_request(env, B.VIRTIO_BLK_T_IN, 4 * i, in_len=512)
    assert len(env.rings.take_used()) == 40
    env.d.w(M.INTERRUPT_ACK_OFFSET, M.INT_USED_BUFFER)
    env.d.w(M.QUEUE_SEL_OFFSET, 0)


def test_transport_round_trip_and_next_request_identical(blk, mem2, tmp_path):
    env, disk = blk
    _busy_blk(env)
    pending = _blk_request(env, B.VIRTIO_BLK_T_IN, 3, in_len=4096, notify=False)
    state = env.t.save()
    irqs_at_save = len(env.irqs)
    assert state["queues"][0]["next_avail"] == 40 and state["device"]["serial"][:8] == b"original"
    disk2 = tmp_path / "disk2.img"
    shutil.copyfile(disk, disk2)
    twin = Twin(env, mem2, disk2)  # default serial: the restore brings the saved one
    try:
        twin.t.restore(through_json(state))
        assert twin.t.save() == state
        assert twin.irqs == []
        assert twin.t.status == env.t.status and twin.t.driver_features == env.t.driver_features
        for off in (M.MAGIC_VALUE_OFFSET, M.DEVICE_ID_OFFSET, M.DEVICE_FEATURES_OFFSET,
                    M.QUEUE_NUM_MAX_OFFSET, M.QUEUE_READY_OFFSET, M.INTERRUPT_STATUS_OFFSET,
                    M.STATUS_OFFSET, M.CONFIG_GENERATION_OFFSET):
            assert twin.d.r(off) == env.d.r(off), hex(off)
        assert [twin.t.read(M.CONFIG_OFFSET + o, 4) for o in range(0, 60, 4)] == \
            [env.t.read(M.CONFIG_OFFSET + o, 4) for o in range(0, 60, 4)]
        # The request made available before the snapshot completes after restore.
        for side in (env.t, twin.t):
            side.kick_all()
        assert mem2.read(pending, 1) == env.mem.read(pending, 1) == bytes([OK])
        # The next requests, on both: identical memory, disk, interrupts.
        for side in (env, twin):
            side.rings.set_used_event(side.rings.used_idx())  # §2.7.10: interrupt me next
            _blk_request(side, B.VIRTIO_BLK_T_OUT, 100, pattern(2048, seed=99))
            _blk_request(side, B.VIRTIO_BLK_T_GET_ID, 0, in_len=20)
            _blk_request(side, B.VIRTIO_BLK_T_IN, 100, in_len=2048)
        assert mem2.read(0, MEM_SIZE) == env.mem.read(0, MEM_SIZE)
        assert disk2.read_bytes() == disk.read_bytes()
        assert twin.irqs and len(twin.irqs) == len(env.irqs) - irqs_at_save
        assert twin.t.save() == env.t.save()
    finally:
        twin.close()


def test_transport_restore_before_driver_ok(mem, mem2):
    from .test_virtio_mmio import FakeDevice
    t = M.VirtioMmioTransport(FakeDevice(), mem, lambda: None)
    d = MmioDriver(t, mem)
    assert d.negotiate()
    assert d.setup_queue(1, 8)
    state = t.save()
    assert state["device"] is None  # a model without save()
    t2 = M.VirtioMmioTransport(FakeDevice(), mem, lambda: None)
    t2.restore(through_json(state))
    assert t2.save() == state and t2.device.activated == 0
    d2 = MmioDriver(t2, mem)
    d2.driver_ok()  # the driver goes on where it was: activation now
    assert t2.device.activated == 1 and t2.queues[1].mem is mem


def _bad_queue(state: dict, **changes) -> dict:
    s = copy.deepcopy(state)
    s["queues"][0].update(changes)
    return s


@pytest.mark.parametrize("make_bad", [
    lambda s: _bad_queue(s, size=12),  # not a power of two
    lambda s: _bad_queue(s, size=512),  # above QueueNumMax
    lambda s: _bad_queue(s, next_avail=70000),  # not a u16
    lambda s: _bad_queue(s, next_avail=(s["queues"][0]["next_used"] + 17) & 0xFFFF),
    lambda s: _bad_queue(s, desc_table=DESC_ADDR + 8),  # §2.7 alignment
    lambda s: _bad_queue(s, used_ring=MEM_SIZE - 8),  # outside RAM
    lambda s: _bad_queue(s, avail_ring=1 << 64),
    lambda s: _bad_queue(s, ready="yes"),
    lambda s: _bad_queue(s, signalled_used=-1),
    lambda s: mutated(s, queues=s["queues"] * 2),
    lambda s: mutated(s, queues=[tuple(s["queues"][0].items())]),
    lambda s: mutated(s, status=s["status"] & ~M.STATUS_FEATURES_OK),  # §3.1.1 order
    lambda s: mutated(s, status=s["status"] | 0x10),
    lambda s: mutated(s, driver_features=s["driver_features"] | 1 << 40),  # unoffered
    lambda s: mutated(s, driver_features=s["driver_features"] & ~(1 << M.VIRTIO_F_VERSION_1)),
    lambda s: mutated(s, interrupt_status=4),
    lambda s: mutated(s, queue_sel=1 << 32),
    lambda s: mutated(s, device=None),
    lambda s: mutated(s, device=mutated(s["device"], capacity=s["device"]["capacity"] + 1)),
    lambda s: mutated(s, device=mutated(s["device"], serial=b"short")),
    lambda s: mutated(s, v=2),
])
def test_transport_bad_state_refused(blk, make_bad):
    env, _ = blk
    _busy_blk(env)
    good = env.t.save()
    refused(env.t, make_bad(good), good)
    # Still the same device: it goes on serving requests.
    st = _blk_request(env, B.VIRTIO_BLK_T_IN, 0, in_len=512)
    assert env.mem.read(st, 1) == bytes([OK])


def test_blk_restore_refuses_other_disk(blk, tmp_path):
    env, disk = blk
    other = tmp_path / "other.img"
    other.write_bytes(pattern(DISK_SECTORS * 512))
    state = env.dev.save()
    with B.VirtioBlk(other, read_only=True) as dev:  # offers RO, no discard
        refused(dev, state)
    other.write_bytes(pattern(DISK_SECTORS * 512 + 512))
    with B.VirtioBlk(other) as dev:  # one sector more
        refused(dev, state)


# --- the overlay ------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.img"
    p.write_bytes(pattern(DISK_SECTORS * 512 + 1000))  # a partial last block too
    return p


def _read_all(backend) -> bytes:
    buf = bytearray(backend.size)
    assert backend.readv([memoryview(buf)], 0) == backend.size
    return bytes(buf)


def _write(backend, off: int, data: bytes) -> None:
    assert backend.writev([memoryview(data)], off) == len(data)


def _busy_overlay(base) -> O.Overlay:
    ov = O.Overlay(RawDisk(base, read_only=True), [str(base.parent)])
    _write(ov, 512, b"A" * 1024)  # a partial block: copy-up
    _write(ov, 40960, pattern(3 * 4096, seed=5))
    _write(ov, ov.size - 1000 - 512, b"Z" * 1512)  # through the partial last block
    ov.zero(200 * 4096 + 512, 4096 * 3)  # present, reading zeros
    return ov


def _files(directory) -> dict:
    return {p: (open(os.path.join(directory, p), "rb").read(),
                os.stat(os.path.join(directory, p)).st_mtime_ns)
            for p in sorted(os.listdir(directory))}


def test_overlay_save_and_reopen(base, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    ov = _busy_overlay(base)
    try:
        contents = _read_all(ov)
        state = ov.save_to(snap, "disk0")
    finally:
        ov.close()
    assert through_json(state) == {"v": 1, "file": "disk0.overlay",
                                   "size": base.stat().st_size, "block_size": O.BLOCK_SIZE}
    assert sorted(os.listdir(snap)) == ["disk0.overlay"]
    data_st = os.stat(snap / "disk0.overlay")
    nblocks = -(-base.stat().st_size // O.BLOCK_SIZE)
    assert data_st.st_size == base.stat().st_size + -(-nblocks // 8) + 32
    assert data_st.st_blocks * 512 <= 64 * 4096  # sparse: only the written blocks
    saved = _files(snap)
    before = _overlay_fds()
    one = O.Overlay.reopen(RawDisk(base, read_only=True), [str(tmp_path)], snap, state)
    two = open_disk(base, snapshot=True, overlay_file=snap / "disk0.overlay")
    try:
        assert _read_all(one) == _read_all(two) == contents
        assert one.bitmap == two.bitmap and one.present(200) and not one.present(100)
        _write(one, 0, b"1" * 4096)  # writes after reopen: private to each overlay
        _write(two, 8192, b"2" * 512)
        assert _read_all(one)[:4096] == b"1" * 4096 and _read_all(two)[:4096] == contents[:4096]
        assert _read_all(two)[8192:8704] == b"2" * 512 != contents[8192:8704]
        assert _read_all(one)[8192:8704] == contents[8192:8704]
        assert _files(snap) == saved
        assert len(_overlay_fds() - before) == 2  # each its own unlinked file
    finally:
        one.close()
        two.close()
    assert _files(snap) == saved
    assert _overlay_fds() == before


def test_overlay_save_twice_replaces(base, tmp_path):
    ov = _busy_overlay(base)
    try:
        ov.save_to(tmp_path, "d")
        _write(ov, 0, b"Q" * 512)
        state = ov.save_to(tmp_path, "d")
        contents = _read_all(ov)
    finally:
        ov.close()
    with O.Overlay.reopen(RawDisk(base, read_only=True), [str(tmp_path)], tmp_path,
                          state) as again:
        assert _read_all(again) == contents
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(O.OverlayStateError):
        O.Overlay(RawDisk(base, read_only=True), [str(tmp_path)]).save_to(tmp_path, "../x")


@pytest.fixture
def saved(base, tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    ov = _busy_overlay(base)
    try:
        state = ov.save_to(snap, "disk0")
    finally:
        ov.close()
    return snap, state


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        f.write(data)


def _cut(path, n: int) -> None:
    """Drop ``n`` bytes before the block map and trailer (they stay at the end)."""
    raw = path.read_bytes()
    path.write_bytes(raw[:4096] + raw[4096 + n:])


@pytest.mark.parametrize("breakit", [
    lambda snap, s: mutated(s, size=s["size"] + 512),
    lambda snap, s: mutated(s, block_size=512),
    lambda snap, s: mutated(s, file="../base.img"),
    lambda snap, s: mutated(s, file="/etc/passwd"),
    lambda snap, s: mutated(s, file=".hidden"),
    lambda snap, s: mutated(s, file=None),
    lambda snap, s: mutated(s, v=2),
    lambda snap, s: mutated(s, extra=1),
    lambda snap, s: (os.unlink(snap / "disk0.overlay"), s)[1],
    lambda snap, s: (os.mkfifo(snap / "fifo"), mutated(s, file="fifo"))[1],
    lambda snap, s: ((snap / "disk0.overlay").write_bytes(b"\0" * 31), s)[1],
    lambda snap, s: (_patch(snap / "disk0.overlay", -32, b"PYVMMCOX"), s)[1],  # magic
    lambda snap, s: (_patch(snap / "disk0.overlay", -24, b"\2"), s)[1],  # version
    lambda snap, s: (_patch(snap / "disk0.overlay", -20, b"\0\2"), s)[1],  # block size
    lambda snap, s: (_patch(snap / "disk0.overlay", -16, b"\0\0\0\0\0\1"), s)[1],  # size
    lambda snap, s: (_patch(snap / "disk0.overlay", -33, b"\xff"), s)[1],  # past the end
    lambda snap, s: (_cut(snap / "disk0.overlay", 4096), s)[1],  # bytes missing
])
def test_overlay_bad_saved_state_refused(base, saved, breakit):
    snap, state = saved
    bad = breakit(snap, copy.deepcopy(state))
    before = _overlay_fds()
    raw = RawDisk(base, read_only=True)
    try:
        with pytest.raises(ValueError) as e:
            O.Overlay.reopen(raw, [str(base.parent)], snap, bad)
        assert isinstance(e.value, DiskError) and "\n" not in str(e.value)
        assert raw.fd >= 0  # the caller's to close
    finally:
        raw.close()
    assert _overlay_fds() == before
    with pytest.raises(ValueError):  # open_disk closes the base itself
        open_disk(base, snapshot=True, overlay_from=(snap, bad))
    if bad == state:  # the file itself is bad: opening it directly fails the same way
        with pytest.raises(ValueError):
            open_disk(base, snapshot=True, overlay_file=snap / "disk0.overlay")
    RawDisk(base).close()  # no lock left behind
    assert _overlay_fds() == before


def test_blk_save_disk_and_reopen(tmp_path, mem, mem2):
    disk = tmp_path / "disk.img"
    image = pattern(DISK_SECTORS * 512)
    disk.write_bytes(image)
    snap = tmp_path / "snap"
    snap.mkdir()
    env = Env(disk, mem, snapshot=True)
    try:
        _blk_request(env, B.VIRTIO_BLK_T_OUT, 10, pattern(4096, seed=3))
        saved = env.dev.save_disk(snap, "virtio-blk0")
        state = env.t.save()
    finally:
        env.close()
    assert saved["v"] == 1 and saved["overlay"]["file"] == "virtio-blk0.overlay"
    files = _files(snap)
    twin = Twin(env, mem2, disk, snapshot=True, saved_disk=(snap, through_json(saved)))
    try:
        twin.t.restore(state)
        st = _blk_request(twin, B.VIRTIO_BLK_T_IN, 10, in_len=4096)
        assert len(twin.rings.take_used()) == 2  # the write before the save, and this
        assert mem2.read(st, 1) == bytes([OK])
        assert mem2.read(st - 4096, 4096) == pattern(4096, seed=3)  # the in buffer
        _blk_request(twin, B.VIRTIO_BLK_T_OUT, 0, b"w" * 512)
    finally:
        twin.close()
    assert _files(snap) == files and disk.read_bytes() == image
    # A raw disk has nothing outside its image; the options must fit the saved disk.
    with B.VirtioBlk(disk) as raw:
        assert raw.save_disk(snap, "raw") == {"v": 1, "overlay": None}
    with pytest.raises(ValueError):
        B.VirtioBlk(disk, saved_disk=(snap, saved))  # an overlay, not a snapshot disk
    with pytest.raises(ValueError):
        B.VirtioBlk(disk, snapshot=True, saved_disk=(snap, {"v": 1, "overlay": None}))
    with pytest.raises(ValueError):
        B.VirtioBlk(disk, snapshot=True, saved_disk=(snap, {"v": 1}))
    RawDisk(disk).close()  # every failed open let go of the image


def test_blk_save_overlay_one_file(tmp_path, mem):
    """The one-file form the snapshot writer uses: save_overlay(path), overlay_file=."""
    disk = tmp_path / "disk.img"
    image = pattern(DISK_SECTORS * 512)
    disk.write_bytes(image)
    env = Env(disk, mem, snapshot=True)
    try:
        _blk_request(env, B.VIRTIO_BLK_T_OUT, 7, pattern(1536, seed=8))
        env.dev.save_overlay(tmp_path / "disk0.overlay")
    finally:
        env.close()
    saved = (tmp_path / "disk0.overlay").read_bytes()
    with B.VirtioBlk(disk, snapshot=True, overlay_file=tmp_path / "disk0.overlay") as dev:
        assert _read_all(dev.backend)[7 * 512:10 * 512] == pattern(1536, seed=8)
        _write(dev.backend, 0, b"n" * 4096)
    assert (tmp_path / "disk0.overlay").read_bytes() == saved and disk.read_bytes() == image
    with B.VirtioBlk(disk) as raw, pytest.raises(DiskError):
        raw.save_overlay(tmp_path / "raw.overlay")
    with pytest.raises(DiskError):
        B.VirtioBlk(disk, overlay_file=tmp_path / "disk0.overlay")  # not a snapshot disk
    assert not (tmp_path / "raw.overlay").exists()
