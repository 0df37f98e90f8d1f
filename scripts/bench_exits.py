#!/usr/bin/env python3
"""Benchmark: port-I/O exit throughput of the run loops, VMM start-up time and memory.

A test guest (guests/tiny/bench_exits.S) does COUNT one-byte writes to the UART in a
tight ring-0 loop. Measured in one run, on the same guest:
  (a) the cffi shim loop (pyvmm's default; UART writes handled in C),
  (b) the pure-Python loop (every exit decoded and dispatched in Python),
  (c) a bare C loop doing only KVM_RUN (the limit: no device work at all).
Plus start-up (exec of `pyvmm boot --raw` to its first KVM_RUN) and the VMM's resident
memory excluding guest RAM, from a child process.
Ratios are against (c) measured in this run; absolute figures depend on the host.
The last lines are machine-readable, one figure each: `shim/bare-C: 0.97`.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import vmm  # noqa: E402
from vmm import tinyguest  # noqa: E402
from vmm.arch.x86_64 import layout  # noqa: E402
from vmm.machine import ExitReason, Machine, MachineConfig  # noqa: E402
from vmm.vcpu import native  # noqa: E402


def run_loop(guest: Path, loop: str, count: int) -> float:
    """Exits per second of one VM run with the given loop."""
    received = [0]
    cfg = MachineConfig(kernel=guest, mem_size=16 << 20, loop=loop,
                        console=lambda data: received.__setitem__(0, received[0] + len(data)))
    with Machine(cfg) as m:
        result = m.run(timeout=600)
        elapsed = m.times["exit"] - m.times["run"]
    if result.reason is not ExitReason.DEBUG_EXIT or received[0] != count:
        raise SystemExit(f"{loop} loop: unexpected end {result} after {received[0]}/{count} bytes")
    return (count + 1) / elapsed


def run_bare(guest: Path, count: int) -> float:
    """Exits per second of the bare C KVM_RUN loop on the same guest (same VM setup)."""
    shim = native()
    cfg = MachineConfig(kernel=guest, mem_size=16 << 20, loop="python")
    with Machine(cfg) as m:
        vcpu = m.loops[0].vcpu
        run = shim.ffi.from_buffer(vcpu.run_page)
        reason = shim.ffi.new("int32_t *")
        t0 = time.perf_counter()
        n = shim.lib.shim_bare_run(vcpu.fd, run, layout.DEBUG_EXIT_PORT, reason)
        elapsed = time.perf_counter() - t0
        shim.ffi.release(run)
    if n != count + 1:
        raise SystemExit(f"bare loop: {n} exits, expected {count + 1} (last reason {reason[0]})")
    return n / elapsed


#: The installed console script, as a user runs it (else the module).
PYVMM = ([str(Path(sys.executable).with_name("pyvmm"))] if Path(sys.executable).with_name("pyvmm").exists()
         else [sys.executable, "-m", "vmm.cli"])


def startup(hello: Path) -> tuple[float, float]:
    """(ms from exec to first KVM_RUN, MiB resident excluding guest RAM) of `pyvmm boot`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, PYVMM_BENCH_STAMPS=f.name)
        t0 = time.monotonic()
        subprocess.run([*PYVMM, "boot", "--raw", str(hello)], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        stamps = json.load(open(f.name))
    return (stamps["run"] - t0) * 1000, (stamps["rss_kib"] - stamps["guest_rss_kib"]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="port writes per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per loop (median is reported)")
    args = ap.parse_args()

    guest = tinyguest.build("bench_exits", {"COUNT": args.count})
    hello = tinyguest.build("hello")
    console = Console(stderr=True)
    rates = {"bare-C": [], "shim": [], "python": []}
    with console.status("measuring...") as status:
        for i in range(args.runs):                 # interleaved, so drift hits all alike
            status.update(f"run {i + 1}/{args.runs}")
            rates["bare-C"].append(run_bare(guest, args.count))
            rates["shim"].append(run_loop(guest, "shim", args.count))
            rates["python"].append(run_loop(guest, "python", args.count))
        # Warm the .pyc files (a first run writes them, unless PYTHONDONTWRITEBYTECODE
        # is set, as on CI; scripts/bootstrap.sh compiles them too) and the page cache.
        compileall.compile_dir(os.path.dirname(vmm.__file__), quiet=1)
        startup(hello)
        starts = [startup(hello) for _ in range(max(args.runs, 5))]
    med = {k: statistics.median(v) for k, v in rates.items()}

    table = Table(title=f"port-I/O exits, {args.count:,} per run, median of {args.runs}")
    table.add_column("run loop")
    table.add_column("exits/s", justify="right")
    table.add_column("vs bare C", justify="right")
    for k in ("bare-C", "shim", "python"):
        table.add_row(k, f"{med[k]:,.0f}", f"{med[k] / med['bare-C']:.2f}")
    console.print(table)
    startup_ms = statistics.median(s[0] for s in starts)
    rss = statistics.median(s[1] for s in starts)
    console.print(f"start-up (exec to first KVM_RUN): {startup_ms:.0f} ms;"
                  f" VMM resident memory excluding guest RAM: {rss:.1f} MiB")
    print(f"bare-C exits/s: {med['bare-C']:.0f}")
    print(f"shim/bare-C: {med['shim'] / med['bare-C']:.2f}")
    print(f"python/bare-C: {med['python'] / med['bare-C']:.2f}")
    print(f"startup_ms: {startup_ms:.0f}")
    print(f"rss_mib: {rss:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
