#!/usr/bin/env python3
"""Benchmark: virtio-blk throughput seen by a guest driver, against the host's own pread/pwrite.

A bare-metal guest (guests/tiny/blkbench.c: a polled virtio-mmio driver) runs each
workload against a disk file full of random data; the same workload is then run by
this process with os.preadv/os.pwritev on the same file (the limit: no VM at all).
Measured in one run, interleaved, median of --runs:
  (a) sequential reads, 1 MiB requests, QD 4, across the whole disk   (MB/s)
  (b) sequential writes, 1 MiB requests, QD 4, across the whole disk  (MB/s)
  (c) random 4 KiB reads, QD 8, at sectors from a 64-bit LCG          (IOPS)
The guest marks the timed phase by writing to a "stamp" MMIO device this script maps
at STAMP_ADDR, so VM start-up and driver initialisation are not counted; the host
side times only its own loop. Both sides run warm-cache (the file is read once before
measuring and stays in the page cache; no drop_caches), so this measures the VMM's
overhead over page-cache copies, not the disk. Write phases are followed by an
untimed fdatasync so dirty pages do not pile up from one measurement to the next.

The guest's own code is interpreted on emulation-only KVM hosts (docs/emulation-only-hosts.md), so
its per-request work (a few dozen instructions) counts; large sequential requests
make it negligible, 4 KiB random reads do not. QEMU cannot run on such hosts, so
there is no QEMU column; the host's pread/pwrite is the reference.

--profile runs the VMM's I/O thread under cProfile for one extra guest run of each
workload and prints where its time goes.

The last lines are machine-readable, one figure each: `seqread_vs_host: 0.85`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import mmap
import os
import pstats
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmm import iothread, tinyguest
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.blk import VirtioBlk
from vmm.devices.virtio.mmio import VirtioMmioTransport
from vmm.machine import DiskConfig, ExitReason, Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.vcpu import default_loop

#: The stamp device: unused MMIO next to the test device (layout.TEST_MMIO_START).
STAMP_ADDR = 0xE000_1000
STAMP_SIZE = 0x1000

MiB = 1 << 20
SECTOR = 512

#: blkbench.c's MODE values.
MODES = {"seqread": 0, "seqwrite": 1, "randread": 2}

#: blkbench.c's LCG (Knuth's MMIX constants), reproduced for the host side.
LCG_MUL = 6364136223846793005
LCG_ADD = 1442695040888963407
U64 = (1 << 64) - 1


class StampDevice:
    """An MMIO BusDevice that records time.perf_counter() at every guest write."""

    def __init__(self) -> None:
        self.stamps: list[tuple[int, float]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.stamps.append((value, time.perf_counter()))

    def elapsed(self) -> float:
        """Seconds between the guest's start (1) and end (2) stamps."""
        marks = dict(self.stamps)
        if set(marks) != {1, 2}:
            raise SystemExit(f"stamp device saw {self.stamps}, expected writes of 1 then 2")
        return marks[2] - marks[1]


@dataclass
class Workload:
    name: str
    bs: int
    qd: int
    count: int          # requests
    unit: str           # "MB/s" or "IOPS"

    def rate(self, seconds: float) -> float:
        if self.unit == "IOPS":
            return self.count / seconds
        return self.count * self.bs / seconds / 1e6


def lcg_blocks(seed: int, count: int, blocks: int) -> list[int]:
    """The block numbers blkbench.c's random mode visits, in order."""
    out, x = [], seed
    for _ in range(count):
        x = (x * LCG_MUL + LCG_ADD) & U64
        out.append((x >> 33) % blocks)
    return out


def make_disk(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def warm(path: Path) -> None:
    """Read the whole file once so both sides start from a warm page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(MiB)
        off = 0
        while n := os.preadv(fd, [buf], off):
            off += n
    finally:
        os.close(fd)


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def run_guest(w: Workload, disk: Path, loop: str, seed: int,
              profile: cProfile.Profile | None = None) -> float:
    """Seconds the guest's timed phase took (stamp to stamp)."""
    guest = tinyguest.build("blkbench", {"MODE": MODES[w.name], "BS": w.bs, "QD": w.qd,
                                         "COUNT": w.count, "SEED": seed})
    out = bytearray()
    stamp = StampDevice()
    cfg = MachineConfig(kernel=guest, mem_size=64 << 20, loop=loop, console=out.extend,
                        disks=[DiskConfig(disk)])
    original_run = iothread.IoThread._run
    if profile is not None:
        iothread.IoThread._run = lambda self: profile.runcall(original_run, self)
    try:
        with Machine(cfg) as m:
            m.mmio.insert(STAMP_ADDR, STAMP_SIZE, stamp, "stamp")
            result = m.run(timeout=600)
    finally:
        iothread.IoThread._run = original_run
    if result.reason is not ExitReason.DEBUG_EXIT or result.status != 0:
        raise SystemExit(f"{w.name}: guest ended with {result} (blkbench.c lists the codes);"
                         f" output {bytes(out)!r}")
    expected = f"reqs={w.count} bytes={w.count * w.bs} ".encode()
    if expected not in out:
        raise SystemExit(f"{w.name}: unexpected guest output {bytes(out)!r}")
    return stamp.elapsed()


def run_host(w: Workload, disk: Path, seed: int) -> float:
    """Seconds this process takes for the same requests with os.preadv/os.pwritev."""
    fd = os.open(disk, os.O_RDWR)
    # One page-aligned, pre-faulted buffer per in-flight request, used in turn, as the
    # guest does with its QD buffers.
    buf = mmap.mmap(-1, w.bs * w.qd)
    buf.write(bytes(w.bs * w.qd))
    views = [[memoryview(buf)[i * w.bs:(i + 1) * w.bs]] for i in range(w.qd)]
    try:
        blocks = os.fstat(fd).st_size // w.bs
        if w.name == "randread":
            offsets = [b * w.bs for b in lcg_blocks(seed, w.count, blocks)]
        else:
            offsets = [(i % blocks) * w.bs for i in range(w.count)]
        func = os.pwritev if w.name == "seqwrite" else os.preadv
        qd = w.qd
        t0 = time.perf_counter()
        for i, off in enumerate(offsets):
            if func(fd, views[i % qd], off) != w.bs:
                raise SystemExit(f"host {w.name}: short transfer at {off}")
        return time.perf_counter() - t0
    finally:
        for v in views:
            v[0].release()
        buf.close()
        os.close(fd)


def run_device(w: Workload, disk: Path, seed: int) -> float:
    """Seconds the device model alone (transport + blk, no VM, no guest) takes for the
    same requests: this process plays a driver that lays out QD requests in a
    GuestMemory at once, as blkbench.c does, and calls the transport's notify() as the
    I/O thread would; only notify() is timed."""
    desc, avail, used, hdrs, bufs = 0x80_0000, 0x81_0000, 0x82_0000, 0x83_0000, 0x100_0000
    qsize, write = 256, w.name == "seqwrite"
    with GuestMemory(bufs + w.qd * w.bs + MiB) as mem, VirtioBlk(disk) as dev:
        t = VirtioMmioTransport(dev, mem, lambda: None)
        for off, value in ((M.STATUS_OFFSET, 1), (M.STATUS_OFFSET, 3),
                           (M.DRIVER_FEATURES_SEL_OFFSET, 1), (M.DRIVER_FEATURES_OFFSET, 1),
                           (M.STATUS_OFFSET, 11), (M.QUEUE_SEL_OFFSET, 0),
                           (M.QUEUE_NUM_OFFSET, qsize), (M.QUEUE_DESC_LOW_OFFSET, desc),
                           (M.QUEUE_DRIVER_LOW_OFFSET, avail),
                           (M.QUEUE_DEVICE_LOW_OFFSET, used), (M.QUEUE_READY_OFFSET, 1),
                           (M.STATUS_OFFSET, 15)):
            t.write(off, 4, value)
        mem.write_int(avail, 2, 1)                           # VIRTQ_AVAIL_F_NO_INTERRUPT
        mem.write(bufs, bytes(w.qd * w.bs))                  # pre-fault, as the guest does
        for s in range(w.qd):
            d, data_flags = 3 * s, 1 if write else 3         # NEXT (| WRITE for reads)
            mem.write(desc + 16 * d, struct.pack("<QIHH", hdrs + 32 * s, 16, 1, d + 1))
            mem.write(desc + 16 * (d + 1), struct.pack("<QIHH", bufs + s * w.bs, w.bs,
                                                       data_flags, d + 2))
            mem.write(desc + 16 * (d + 2), struct.pack("<QIHH", hdrs + 32 * s + 16, 1, 2, 0))
        nblocks = dev.capacity * SECTOR // w.bs
        blocks = (lcg_blocks(seed, w.count, nblocks) if w.name == "randread"
                  else [i % nblocks for i in range(w.count)])
        idx, elapsed = 0, 0.0
        for first in range(0, w.count, w.qd):
            batch = blocks[first:first + w.qd]
            for s, b in enumerate(batch):
                mem.write(hdrs + 32 * s, struct.pack("<IIQ", int(write), 0, b * w.bs // SECTOR))
                mem.write_int(avail + 4 + 2 * (idx % qsize), 2, 3 * s)
                idx = (idx + 1) & 0xFFFF
            mem.write_int(avail + 2, 2, idx)
            t0 = time.perf_counter()
            t.notify(0)
            elapsed += time.perf_counter() - t0
            if any(mem.read_int(hdrs + 32 * s + 16, 1) for s in range(len(batch))):
                raise SystemExit(f"device-only {w.name}: a request failed")
        if mem.read_int(used + 2, 2) != idx:
            raise SystemExit(f"device-only {w.name}: not every request completed")
    return elapsed


def top_functions(profile: cProfile.Profile, n: int = 12) -> str:
    s = io.StringIO()
    pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(n)
    lines = s.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:start + n + 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disk-mib", type=int, default=256, help="test disk size (MiB)")
    ap.add_argument("--rand-count", type=int, default=20_000, help="4 KiB random reads per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per workload (median is reported)")
    ap.add_argument("--loop", default=default_loop(), choices=["shim", "python"],
                    help="vCPU run loop (disk I/O runs on the I/O thread either way)")
    ap.add_argument("--seed", type=int, default=12345, help="LCG seed for random reads")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the I/O thread (cProfile) in one extra guest run each")
    args = ap.parse_args()

    size = args.disk_mib * MiB
    workloads = [Workload("seqread", MiB, 4, size // MiB, "MB/s"),
                 Workload("seqwrite", MiB, 4, size // MiB, "MB/s"),
                 Workload("randread", 4096, 8, args.rand_count, "IOPS")]
    console = Console(stderr=True)
    console.width = max(console.width, 120)
    guest_rates = {w.name: [] for w in workloads}
    device_rates = {w.name: [] for w in workloads}
    host_rates = {w.name: [] for w in workloads}
    load_before = os.getloadavg()[0]
    profiles: dict[str, cProfile.Profile] = {}
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-blk-") as tmp:
        disk = Path(tmp) / "disk.img"
        with console.status(f"creating a {args.disk_mib} MiB disk of random data...") as status:
            make_disk(disk, size)
            for w in workloads:              # build (cached) before timing anything
                run_guest(Workload(w.name, w.bs, w.qd, 1, w.unit), disk, args.loop, args.seed)
            warm(disk)
            for i in range(args.runs):       # interleaved, so drift hits both sides alike
                for w in workloads:
                    status.update(f"run {i + 1}/{args.runs}: {w.name}")
                    host_rates[w.name].append(w.rate(run_host(w, disk, args.seed)))
                    if w.name == "seqwrite":
                        sync(disk)
                    guest_rates[w.name].append(w.rate(run_guest(w, disk, args.loop, args.seed)))
                    if w.name == "seqwrite":
                        sync(disk)
                    device_rates[w.name].append(w.rate(run_device(w, disk, args.seed)))
                    if w.name == "seqwrite":
                        sync(disk)
            if args.profile:
                for w in workloads:
                    status.update(f"profiling the I/O thread: {w.name}")
                    profiles[w.name] = cProfile.Profile()
                    run_guest(w, disk, args.loop, args.seed, profiles[w.name])
                    sync(disk)

    med_g = {k: statistics.median(v) for k, v in guest_rates.items()}
    med_h = {k: statistics.median(v) for k, v in host_rates.items()}
    med_d = {k: statistics.median(v) for k, v in device_rates.items()}
    load_after = os.getloadavg()[0]
    table = Table(title=f"virtio-blk, {args.disk_mib} MiB disk, warm page cache, "
                        f"{args.loop} loop, median of {args.runs}")
    table.add_column("workload")
    table.add_column("guest", justify="right")
    table.add_column("device only", justify="right")
    table.add_column("host pread/pwrite", justify="right")
    table.add_column("guest/host", justify="right")
    table.add_column("device/host", justify="right")
    table.add_column("QEMU", justify="right")
    for w in workloads:
        label = {"seqread": "seq read 1M QD4", "seqwrite": "seq write 1M QD4",
                 "randread": "rand read 4K QD8"}[w.name]
        table.add_row(label, f"{med_g[w.name]:,.0f} {w.unit}", f"{med_d[w.name]:,.0f} {w.unit}",
                      f"{med_h[w.name]:,.0f} {w.unit}", f"{med_g[w.name] / med_h[w.name]:.2f}",
                      f"{med_d[w.name] / med_h[w.name]:.2f}", "n/a")
    console.print(table)
    console.print("guest: the driver guest in a VM, timed by its stamps; device only: the "
                  "transport + blk model driven by this process, no VM; host: this "
                  "process's own preadv/pwritev.")
    ncpu = os.cpu_count() or 1
    console.print(f"load average {load_before:.1f} before, {load_after:.1f} after, {ncpu} CPUs"
                  + (" [bold red]-- other work competed for the CPUs: the guest figures are "
                     "noisy[/]" if max(load_before, load_after) > ncpu - 1 else ""))
    console.print("QEMU cannot run on this host (emulation-only nested KVM: see "
                  "docs/emulation-only-hosts.md), so the host's own pread/pwrite is the reference.")
    for name, prof in profiles.items():
        console.print(f"\n[bold]I/O thread profile, {name}[/] (cProfile, by own time)")
        console.print(top_functions(prof), markup=False, highlight=False, soft_wrap=True)

    for w in workloads:
        unit = "iops" if w.unit == "IOPS" else "mbps"
        print(f"{w.name}_guest_{unit}: {med_g[w.name]:.0f}")
        print(f"{w.name}_device_{unit}: {med_d[w.name]:.0f}")
        print(f"{w.name}_host_{unit}: {med_h[w.name]:.0f}")
    for w in workloads:
        print(f"{w.name}_vs_host: {med_g[w.name] / med_h[w.name]:.2f}")
    for w in workloads:
        print(f"{w.name}_device_vs_host: {med_d[w.name] / med_h[w.name]:.2f}")
    print(f"loadavg: {max(load_before, load_after):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
