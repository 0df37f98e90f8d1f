#!/usr/bin/env python3
"""Benchmark: the virtio-net frame path seen by a guest driver, against the host's own
socketpair.

A bare-metal guest (guests/tiny/netbench.c: a polled virtio-mmio net driver) sends
frames to, or receives them from, a peer thread in this process on the other end of a
socketpair (vmm/net/base.py SocketpairBackend, the qemu/passt stream framing), for
three frame sizes: 60 bytes, 1514 bytes (an MTU-1500 frame) and 65550 bytes (the
largest, "64 KiB"). The reference is the same frames sent by one thread of this process
to another over a socketpair with the same framing (no VM): the limit of the backend's
transport. Median of --runs, interleaved.

The guest marks the timed phase on a "stamp" MMIO device (tx: first to last frame; rx:
first frame received to the end frame), so VM start-up is not counted. Its code is
interpreted on emulation-only KVM hosts, so small frames measure the guest's
per-frame instructions more than the VMM. rx frames the guest had no buffer for are
dropped by the device (counted; the guest's count is what it received).

The last lines are machine-readable: `tx_65550_vs_host: 0.71`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

from vmm import tinyguest
from vmm.devices.virtio import mmio as M
from vmm.machine import ExitReason, Machine, MachineConfig
from vmm.net.base import SocketpairBackend, StreamFramer, frame_header
from vmm.vcpu import default_loop

STAMP_ADDR = 0xE000_1000   # unused MMIO next to the test device, as bench_blk.py
STAMP_SIZE = 0x1000
MAC = bytes.fromhex("525400000002")
END_SEQ = 0xFFFFFFFF


class StampDevice:
    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.stamps.append((value, time.perf_counter()))

    def elapsed(self) -> float:
        marks = dict(self.stamps)
        if set(marks) != {1, 2}:
            raise SystemExit(f"stamp device saw {self.stamps}, expected writes of 1 then 2")
        return marks[2] - marks[1]


def make_frame(size: int, seq: int) -> bytes:
    head = b"\xff" * 6 + bytes.fromhex("525400000001") + b"\x88\xb5" + seq.to_bytes(4, "little")
    return head + bytes(size - len(head))


def read_frames(sock: socket.socket, count: int, size: int) -> int:
    """Read frames from ``sock`` until ``count`` arrived (or EOF); returns how many."""
    framer, got = StreamFramer(), 0
    buf = bytearray(1 << 18)   # reused, as the backend does (no page faults per read)
    with memoryview(buf) as mv:
        while got < count:
            try:
                n = sock.recv_into(buf)
            except OSError:
                break
            if not n:
                break
            for f in framer.push(mv[:n]):
                if len(f) != size:
                    raise SystemExit(f"peer: a {len(f)}-byte frame, expected {size}")
                got += 1
    return got


def run_guest(mode: str, size: int, count: int, qd: int, loop: str) -> tuple[float, int, dict]:
    """(seconds of the guest's timed phase, frames the receiver got, device stats)."""
    guest = tinyguest.build("netbench", {"MODE": int(mode == "rx"), "FRAME": size,
                                         "COUNT": count, "QD": qd})
    out = bytearray()
    stamp = StampDevice()
    backend = SocketpairBackend()
    peer = backend.peer
    stop = threading.Event()
    got = [0]

    def tx_peer() -> None:
        got[0] = read_frames(peer, count, size)

    def rx_peer() -> None:
        # Frames sent before the driver is up would be dropped by its device reset.
        while not transport.status & M.STATUS_DRIVER_OK:
            if stop.wait(0.001):
                return
        try:
            for seq in range(count):
                peer.sendmsg([frame_header(size), make_frame(size, seq)])
            end = frame_header(size) + make_frame(size, END_SEQ)
            while not stop.wait(0.005):
                peer.sendall(end)
        except OSError:
            pass

    with Machine(MachineConfig(kernel=guest, mem_size=64 << 20, loop=loop,
                               console=out.extend)) as m:
        nic = m.attach_nic(backend, MAC)
        transport = m.virtio[-1].transport
        m.mmio.insert(STAMP_ADDR, STAMP_SIZE, stamp, "stamp")
        t = threading.Thread(target=tx_peer if mode == "tx" else rx_peer, daemon=True)
        t.start()
        try:
            result = m.run(timeout=600)
        finally:
            stop.set()
        stats = dict(nic.stats)
        if mode == "tx":
            t.join(10)
    t.join(10)
    if result.reason is not ExitReason.DEBUG_EXIT or result.status != 0:
        raise SystemExit(f"{mode} {size}: guest ended with {result}; output {bytes(out)!r}")
    line = bytes(out).decode(errors="replace").strip()
    frames = int(line.split("frames=")[1].split()[0])
    return stamp.elapsed(), got[0] if mode == "tx" else frames, stats


def run_host(size: int, count: int) -> float:
    """Seconds for ``count`` frames from one thread to another over a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    frames = [make_frame(size, i) for i in range(min(count, 64))]
    got = [0]
    reader = threading.Thread(target=lambda: got.__setitem__(0, read_frames(b, count, size)))
    t0 = time.perf_counter()
    reader.start()
    hdr = frame_header(size)
    for i in range(count):
        a.sendmsg([hdr, frames[i % len(frames)]])
    reader.join()
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    if got[0] != count:
        raise SystemExit(f"host socketpair: {got[0]} of {count} frames arrived")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--loop", default=default_loop(), choices=["shim", "python"])
    ap.add_argument("--qd", type=int, default=32, help="guest buffers in flight")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the frame counts")
    args = ap.parse_args()
    sizes = {60: 3000, 1514: 3000, 65550: 1000}
    cases = [(mode, size, max(10, int(n * args.scale))) for size, n in sizes.items()
             for mode in ("tx", "rx")]
    console = Console(stderr=True)
    console.width = max(console.width, 120)
    guest = {c: [] for c in cases}
    host = {size: [] for size in sizes}
    drops = {c: 0 for c in cases}
    load_before = os.getloadavg()[0]
    with console.status("building the guest...") as status:
        for mode, size, _ in cases:
            run_guest(mode, size, 10, args.qd, args.loop)   # build (cached) and warm up
        for i in range(args.runs):
            for size, n in sizes.items():
                status.update(f"run {i + 1}/{args.runs}: host socketpair {size}")
                host[size].append(run_host(size, max(10, int(n * args.scale))))
            for c in cases:
                mode, size, count = c
                status.update(f"run {i + 1}/{args.runs}: guest {mode} {size}")
                secs, frames, stats = run_guest(mode, size, count, args.qd, args.loop)
                guest[c].append((frames / secs, frames * size / secs / 1e6))
                drops[c] += stats["rx_no_buffer"]
    load_after = os.getloadavg()[0]
    table = Table(title=f"virtio-net frame path vs host socketpair, {args.loop} loop, "
                        f"QD {args.qd}, median of {args.runs}")
    for col in ("case", "guest frames/s", "guest MB/s", "host frames/s", "host MB/s",
                "guest/host", "rx dropped"):
        table.add_column(col, justify="right")
    ratios = {}
    for c in cases:
        mode, size, count = c
        fps = statistics.median(r[0] for r in guest[c])
        mbs = statistics.median(r[1] for r in guest[c])
        hsec = statistics.median(host[size])
        hfps = count / hsec
        hmbs = count * size / hsec / 1e6
        ratios[c] = fps / hfps
        table.add_row(f"{mode} {size} B", f"{fps:,.0f}", f"{mbs:,.1f}", f"{hfps:,.0f}",
                      f"{hmbs:,.1f}", f"{ratios[c]:.2f}", str(drops[c]) if mode == "rx" else "-")
    console.print(table)
    console.print(f"load average {load_before:.1f} before, {load_after:.1f} after, "
                  f"{os.cpu_count()} CPUs")
    for c in cases:
        print(f"{c[0]}_{c[1]}_vs_host: {ratios[c]:.2f}")
    print(f"loadavg: {max(load_before, load_after):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
