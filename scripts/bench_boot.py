#!/usr/bin/env python3
"""Benchmark: boot phases of the default Linux guest, host-side vs in-guest decompression.

Boots the default guest's bzImage (gzip payload) with the command `true` (so /init
powers off as soon as user space is up), through the `pyvmm boot` command line, in two
ways measured in the same run:
  elf      --kernel-mode elf: pyvmm decompresses the payload on the host and starts the
           vmlinux at its ELF entry (what pyvmm does by default);
  bzimage  --kernel-mode bzimage: the kernel's own decompressor runs in the guest (on
           emulation-only KVM hosts its ring-0 code is interpreted: minutes).
Phases, from the CLOCK_MONOTONIC stamps pyvmm writes with PYVMM_BENCH_STAMPS:
  exec -> kernel entry (VMM setup), -> first console byte, -> ready marker
  ("pyvmm: ready" from /init), -> VM exit (power-off).
The ready marker is taken from the stamps when pyvmm recorded it, else from the moment
this script read the marker from pyvmm's stdout (same clock; pyvmm only tracks the
marker itself for the default guest started without a KERNEL argument).
Medians over the runs. A rich table goes to stderr; machine-readable lines, one figure
each (`elf_ready_s: 47.1`), are printed last on stdout. A bzImage run that does not
finish within --bzimage-timeout is reported as "timed out after N s", not as a failure.
Absolute times depend on the host; compare the ratio (in-guest / host-side).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmm import guestbuild

EXIT_STOPPED = 130
#: (key, label, stamp at the phase's end); each phase starts at the previous one's end.
PHASES = [
    ("setup", "exec -> kernel entry (VMM setup)", "run"),
    ("first_output", "-> first console byte", "first-output"),
    ("ready", "-> ready marker", "ready"),
    ("exit", "-> VM exit", "exit"),
]
MODES = {"elf": "host-side decompression (elf)", "bzimage": "in-guest decompressor (bzimage)"}


@dataclass
class Run:
    mode: str
    status: int | None = None          # pyvmm's exit status (None: killed by us)
    timed_out: bool = False
    wall_s: float = 0.0
    stamps: dict = field(default_factory=dict)
    error: str = ""

    def phase_ends(self) -> dict[str, float] | None:
        """{stamp: seconds since exec}, or None when the run did not complete."""
        if self.timed_out or self.status != 0 or "exec" not in self.stamps:
            return None
        t0 = self.stamps["exec"]
        ends = {}
        for _, _, key in PHASES:
            if self.stamps.get(key) is None:
                return None
            ends[key] = self.stamps[key] - t0
        return ends


def pyvmm_command() -> list[str]:
    exe = shutil.which("pyvmm")
    return [exe] if exe else [sys.executable, "-m", "vmm.cli"]


def boot_once(mode: str, kernel: Path, initrd: Path, mem: str, timeout: float,
              console: Console, cpus: int = 1) -> Run:
    run = Run(mode)
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        stamps_path = Path(tmp) / "stamps.json"
        argv = [*pyvmm_command(), "boot", str(kernel), "--initrd", str(initrd),
                "--kernel-mode", mode.split("-")[0], "--mem", mem, "--timeout", str(timeout),
                "--cpus", str(cpus),
                "--cmdline", guestbuild.command_param("true")]
        env = dict(os.environ, PYVMM_BENCH_STAMPS=str(stamps_path))
        t_start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        seen: dict[str, float] = {}
        tail = {"stdout": b"", "stderr": b""}

        def read_stdout():
            marker = guestbuild.READY_MARKER.encode()
            for line in proc.stdout:
                if marker in line and "ready" not in seen:
                    seen["ready"] = time.monotonic()
                tail["stdout"] = (tail["stdout"] + line)[-4000:]

        def read_stderr():
            for line in proc.stderr:
                tail["stderr"] = (tail["stderr"] + line)[-4000:]

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=read_stderr, daemon=True)]
        for t in readers:
            t.start()
        try:
            run.status = proc.wait(timeout=timeout + 60)
        except subprocess.TimeoutExpired:   # pyvmm ignored its own --timeout
            proc.kill()
            proc.wait()
            run.timed_out = True
            run.error = "pyvmm did not stop at its --timeout; killed"
        for t in readers:
            t.join(timeout=5)
        run.wall_s = time.monotonic() - t_start
        if stamps_path.exists():
            run.stamps = json.loads(stamps_path.read_text())
        if run.stamps.get("ready") is None and "ready" in seen:
            run.stamps["ready"] = seen["ready"]
        if run.status == EXIT_STOPPED:
            run.timed_out = True
        elif run.status != 0 and not run.error:
            run.error = (f"pyvmm exited with status {run.status}; stderr tail:\n"
                         + tail["stderr"].decode(errors="replace")[-1500:]
                         + "\nstdout tail:\n" + tail["stdout"].decode(errors="replace")[-1500:])
        elif run.status == 0 and b"pyvmm: exit 0" not in tail["stdout"]:
            run.error = "the guest powered off without reporting 'pyvmm: exit 0'"
            run.status = -1
    what = ("timed out after %.0f s" % timeout if run.timed_out
            else "failed" if run.error else "%.1f s" % run.wall_s)
    console.print(f"  {mode}: {what}")
    return run


def medians(runs: list[Run]) -> dict[str, float] | None:
    """Median seconds-since-exec of each phase end over the completed runs."""
    done = [e for r in runs if (e := r.phase_ends()) is not None]
    if not done:
        return None
    return {key: statistics.median(d[key] for d in done) for _, _, key in PHASES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="host-side (elf) boots (default 3)")
    ap.add_argument("--bzimage-runs", type=int, default=1,
                    help="in-guest decompressor boots (default 1)")
    ap.add_argument("--bzimage-timeout", type=float, default=900.0,
                    help="give up on an in-guest decompressor boot after this many seconds "
                         "(default 900)")
    ap.add_argument("--elf-timeout", type=float, default=300.0,
                    help="limit for each host-side boot in seconds (default 300)")
    ap.add_argument("--skip-bzimage", action="store_true",
                    help="only measure host-side decompression")
    ap.add_argument("--mem", default="256M", help="guest RAM (default 256M)")
    ap.add_argument("--cpus", default="1",
                    help="comma-separated vCPU counts for the host-side boots, e.g. 1,2,4 "
                         "(default 1); the in-guest decompressor runs with 1")
    args = ap.parse_args()
    try:
        cpu_counts = [int(c) for c in args.cpus.split(",")]
    except ValueError:
        ap.error("--cpus takes comma-separated numbers, e.g. 1,2,4")
    if args.runs < 1 or args.bzimage_runs < 0:
        ap.error("--runs must be >= 1 and --bzimage-runs >= 0")

    console = Console(stderr=True)
    try:
        kernel = guestbuild.build_kernel("gzip").bzimage
        initrd = guestbuild.build_initramfs()
    except guestbuild.GuestBuildError as e:
        console.print(f"bench_boot: cannot build the default guest: {e}")
        return 1

    plan = []
    for n in cpu_counts:
        mode = "elf" if n == 1 else f"elf-{n}cpu"
        MODES.setdefault(mode, f"host-side, {n} vCPUs")
        plan.append((mode, args.runs, args.elf_timeout, n))
    if not args.skip_bzimage and args.bzimage_runs:
        plan.append(("bzimage", args.bzimage_runs, args.bzimage_timeout, 1))
    results: dict[str, list[Run]] = {}
    for mode, n, timeout, cpus in plan:
        console.print(f"[bold]{MODES[mode]}[/]: {n} boot(s) of {kernel}")
        results[mode] = [boot_once(mode, kernel, initrd, args.mem, timeout, console, cpus)
                         for _ in range(n)]

    failed = [r for rs in results.values() for r in rs if r.error and not r.timed_out]
    for r in failed:
        console.print(f"[red]{r.mode} run failed:[/] {r.error}")

    med = {mode: medians(rs) for mode, rs in results.items()}
    table = Table(title=f"Default guest boot phases (median; seconds since exec; "
                        f"{kernel.name}, gzip payload)", title_justify="left")
    table.add_column("phase")
    for mode in results:
        done = sum(r.phase_ends() is not None for r in results[mode])
        table.add_column(f"{MODES[mode]}\n{done}/{len(results[mode])} runs", justify="right")
    both = med.get("elf") and med.get("bzimage")
    if both:
        table.add_column("ratio\nin-guest / host", justify="right")
    lines: list[str] = []
    for key, label, stamp in PHASES:
        row = [label]
        for mode in results:
            m = med[mode]
            if m is None:
                row.append("-")
                continue
            idx = [p[2] for p in PHASES].index(stamp)
            start = m[PHASES[idx - 1][2]] if idx else 0.0
            row.append(f"{m[stamp]:.2f} (+{m[stamp] - start:.2f})")
            lines.append(f"{mode}_{key}_s: {m[stamp]:.2f}")
        if both:
            row.append(f"{med['bzimage'][stamp] / med['elf'][stamp]:.2f}"
                       if med["elf"][stamp] > 0 else "-")
        table.add_row(*row)
    console.print(table)
    for mode, rs in results.items():
        timed_out = [r for r in rs if r.timed_out]
        if timed_out:
            limit = args.bzimage_timeout if mode == "bzimage" else args.elf_timeout
            msg = f"{len(timed_out)}/{len(rs)} run(s) timed out after {limit:.0f} s"
            console.print(f"{MODES[mode]}: {msg}")
            lines.append(f"{mode}_status: {msg}")
        else:
            lines.append(f"{mode}_status: ok" if med[mode] else f"{mode}_status: failed")
        ok = [r for r in rs if r.phase_ends() is not None]
        if ok:
            lines.append(f"{mode}_rss_mib: {statistics.median(r.stamps.get('rss_kib', 0) for r in ok) / 1024:.1f}")
    if both:
        ratio = med["bzimage"]["ready"] / med["elf"]["ready"]
        console.print(f"in-guest decompressor / host-side decompression, exec -> ready: "
                      f"[bold]{ratio:.2f}x[/]")
        lines.append(f"bzimage_over_elf_ready_ratio: {ratio:.2f}")
        lines.append(f"bzimage_over_elf_first_output_ratio: "
                     f"{med['bzimage']['first-output'] / med['elf']['first-output']:.2f}")
    print("\n".join(lines), flush=True)
    return 1 if failed or any(m is None for k, m in med.items() if k != "bzimage") else 0


if __name__ == "__main__":
    sys.exit(main())
