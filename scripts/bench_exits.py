#!/usr/bin/env python3
"""Benchmark: port-I/O exit throughput of the run loops, VMM start-up time and memory.

A test guest (guests/tiny/bench_exits.S) does COUNT one-byte writes to the UART in a
tight ring-0 loop. Measured in one run, on the same guest:
  (a) the cffi shim loop (pyvmm's default; UART writes handled in C),
  (b) the pure-Python loop (every exit decoded and dispatched in Python),
  (c) a bare C loop doing only KVM_RUN (the limit: no device work at all).
Plus start-up, exec to the first KVM_RUN, of `pyvmm boot --raw` (a tiny guest) and of
`pyvmm boot` (the default Linux guest, found in the cache; stopped by --timeout right
after it started), and the VMM's resident memory excluding guest RAM, from child
processes. The default guest must have been built (scripts/build-guest.py) or its
start-up is skipped.
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

from rich.console import Console
from rich.table import Table

import vmm
from vmm import tinyguest
from vmm.arch.x86_64 import layout
from vmm.machine import ExitReason, Machine, MachineConfig
from vmm.vcpu import native


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


def startup(hello: Path | None) -> tuple[float, float]:
    """(ms from exec to first KVM_RUN, MiB resident excluding guest RAM) of
    `pyvmm boot --raw HELLO`, or with ``hello=None`` of `pyvmm boot` (default guest),
    which --timeout stops once it has run a moment (exit status 130)."""
    argv = ["boot", "--raw", str(hello)] if hello is not None else \
        ["boot", "--timeout", "0.3", "--no-snapshot-cache"]   # a boot, not a restore
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = dict(os.environ, PYVMM_BENCH_STAMPS=f.name)
        t0 = time.monotonic()
        p = subprocess.run([*PYVMM, *argv], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if p.returncode not in (0, 130):
            raise SystemExit(f"pyvmm {' '.join(argv)}: exit {p.returncode}: "
                             f"{p.stderr.decode(errors='replace').strip()}")
        stamps = json.load(open(f.name))
    return (stamps["run"] - t0) * 1000, (stamps["rss_kib"] - stamps["guest_rss_kib"]) / 1024


def default_guest_built() -> bool:
    """True when the default guest is in the cache (the benchmark never builds it)."""
    from vmm import defaultguest, guestbuild
    if defaultguest._lookup() is not None:
        return True
    try:
        key = guestbuild.kernel_cache_key(
            guestbuild.source_version(), guestbuild.FRAGMENT_PATH.read_bytes(),
            guestbuild._patches(), "gzip")
    except guestbuild.GuestBuildError:
        return False
    return (guestbuild.cache_dir() / f"kernel-{key}").is_dir()


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
        have_default = default_guest_built()
        if have_default:
            startup(None)      # writes the default guest's manifest and the host verdict
        starts, starts_default = [], []
        for _ in range(max(args.runs, 5)):         # interleaved as well
            starts.append(startup(hello))
            if have_default:
                starts_default.append(startup(None))
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
    console.print(f"start-up (exec to first KVM_RUN), boot --raw: {startup_ms:.0f} ms;"
                  f" VMM resident memory excluding guest RAM: {rss:.1f} MiB")
    if starts_default:
        startup_default_ms = statistics.median(s[0] for s in starts_default)
        rss_default = statistics.median(s[1] for s in starts_default)
        console.print(f"start-up, boot (default guest): {startup_default_ms:.0f} ms;"
                      f" VMM resident memory excluding guest RAM: {rss_default:.1f} MiB")
    else:
        console.print("default guest not built (scripts/build-guest.py): its start-up "
                      "was not measured")
    print(f"bare-C exits/s: {med['bare-C']:.0f}")
    print(f"shim/bare-C: {med['shim'] / med['bare-C']:.2f}")
    print(f"python/bare-C: {med['python'] / med['bare-C']:.2f}")
    print(f"startup_ms: {startup_ms:.0f}")
    print(f"rss_mib: {rss:.1f}")
    if starts_default:
        print(f"startup_default_ms: {startup_default_ms:.0f}")
        print(f"rss_default_mib: {rss_default:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
