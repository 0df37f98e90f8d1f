#!/usr/bin/env python3
"""How long disposable guests take: ``pyvmm run -- true`` and ``Guest.run("true")``.

Measures, in one run on this host:
  * ``pyvmm run --timings -- true`` as a subprocess (N times): wall time from exec to
    exit, split into boot to agent ready / command / teardown (pyvmm's --timings lines);
  * ``Guest.run("true")`` and ``Guest.run(["true"])`` on one already-booted guest
    (median of N each): the per-command cost of the control channel and the agent.

Prints a rich table, then one machine-readable line per figure:
``bench_run <name> <milliseconds>``. On emulation-only KVM hosts (docs/emulation-only-hosts.md)
the boot dominates; compare figures only within one run.

    python scripts/bench_run.py [--runs 3] [--commands 20]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path



def cli_argv() -> list[str]:
    """The installed pyvmm, as a user runs it (the interpreter's own console script)."""
    script = Path(sys.executable).with_name("pyvmm")
    return [str(script), "run"] if script.exists() else [sys.executable, "-m", "vmm.cli", "run"]


def bench_cli(runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.run([*cli_argv(), "--timings", "--", "true"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=1200)
        wall = (time.monotonic() - t0) * 1000
        if p.returncode != 0:
            sys.exit(f"pyvmm run -- true failed ({p.returncode}):\n{p.stderr}")
        out.setdefault("cli_wall", []).append(wall)
        for name, ms in re.findall(r"pyvmm: timing: (.+?): (\d+) ms", p.stderr):
            key = {"boot to agent ready": "cli_boot", "command": "cli_command",
                   "teardown": "cli_teardown"}.get(name)
            if key:
                out.setdefault(key, []).append(float(ms))
    return out


def bench_api(commands: int) -> dict[str, list[float]]:
    from vmm import Guest
    out: dict[str, list[float]] = {}
    t0 = time.monotonic()
    g = Guest()
    g.start()
    out["api_boot"] = [(time.monotonic() - t0) * 1000]
    try:
        for name, cmd in (("api_run_sh_true", "true"), ("api_run_exec_true", ["true"])):
            for _ in range(commands):
                t = time.monotonic()
                assert g.run(cmd).exit_code == 0
                out.setdefault(name, []).append((time.monotonic() - t) * 1000)
    finally:
        t = time.monotonic()
        g.close()
        out["api_close"] = [(time.monotonic() - t) * 1000]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="pyvmm run -- true repetitions (default 3)")
    ap.add_argument("--commands", type=int, default=20,
                    help="Guest.run('true') repetitions per variant (default 20)")
    args = ap.parse_args()

    results = {**bench_cli(args.runs), **bench_api(args.commands)}
    labels = {
        "cli_wall": "pyvmm run -- true: exec to exit",
        "cli_boot": "  boot to agent ready",
        "cli_command": "  command (RUN to EXIT)",
        "cli_teardown": "  teardown (stop VM, close)",
        "api_boot": "Guest(): boot to agent ready",
        "api_run_sh_true": "Guest.run('true') (sh -c), booted guest",
        "api_run_exec_true": "Guest.run(['true']) (exec), booted guest",
        "api_close": "Guest.close()",
    }
    from rich.console import Console
    from rich.table import Table
    table = Table(title="pyvmm disposable guests", title_justify="left")
    for col, justify in (("what", "left"), ("n", "right"), ("median ms", "right"),
                         ("min ms", "right"), ("max ms", "right")):
        table.add_column(col, justify=justify)
    for key, label in labels.items():
        v = results.get(key)
        if v:
            table.add_row(label, str(len(v)), f"{statistics.median(v):.0f}", f"{min(v):.0f}",
                          f"{max(v):.0f}")
    Console().print(table)
    for key in labels:
        if results.get(key):
            print(f"bench_run {key} {statistics.median(results[key]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
