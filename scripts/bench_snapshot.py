#!/usr/bin/env python3
"""Benchmark: snapshot and restore, measured in one run on this host.

Tiny bare-metal guest (guests/tiny/counter.S, exact and quick):
  * snapshot time and size on disk (`pyvmm boot --raw --snapshot-on`);
  * exec -> first KVM_RUN of `pyvmm restore DIR`, against `pyvmm boot --raw` of the
    same guest (the baseline: the same VMM starting without a snapshot);
  * the same restore of a 2 GiB guest against a 256 MiB one (restore time must not
    grow with RAM).
Default Linux guest (skipped with --no-linux; the first run boots it once):
  * cold `pyvmm run -- true` (--no-snapshot-cache: a full boot) against warm (restored
    from the cache), and Guest() start -> agent ready when restored;
  * cold against warm `pyvmm run --rootfs IMG -- true` (the disk inserted into an
    empty drive after the restore);
  * `pyvmm boot` of the default guest: exec -> shell prompt booted (the first boot,
    which saves the "shell ready" snapshot) against restored;
  * 8 concurrent restores of one snapshot: wall time, and each guest's guest-memory
    pages: private (copied on write) vs shared with the snapshot's page cache, and the
    total PSS of guest memory.
Ratios are against baselines measured in this run; the last lines are machine-readable
(`name: value`). Targets (issue #11): restore first KVM_RUN <= 60 ms; 2 GiB within 1.2x
of 256 MiB; warm run >= 30x faster than cold; concurrent restores share their pages.
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
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmm import tinyguest

PYVMM = ([str(Path(sys.executable).with_name("pyvmm"))] if Path(sys.executable).with_name("pyvmm").exists()
         else [sys.executable, "-m", "vmm.cli"])


def stamped(argv: list[str], env: dict | None = None, stdin: bytes | None = None) -> tuple[dict, float, subprocess.CompletedProcess]:
    """Run pyvmm with PYVMM_BENCH_STAMPS; returns (stamps, exec time, process)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        e = dict(os.environ, PYVMM_BENCH_STAMPS=f.name, **(env or {}))
        t0 = time.monotonic()
        p = subprocess.run([*PYVMM, *argv], env=e, input=stdin if stdin is not None else b"",
                           capture_output=True)
        stamps = json.load(open(f.name)) if os.path.getsize(f.name) else {}
    return stamps, t0, p


def first_run_ms(argv: list[str]) -> float:
    stamps, t0, p = stamped(argv)
    if p.returncode not in (0, 130) or "run" not in stamps:
        raise SystemExit(f"pyvmm {' '.join(argv)}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    return (stamps["run"] - t0) * 1000


def make_tiny_snapshot(directory: Path, mem: str) -> tuple[float, int]:
    """(seconds the save took, bytes on disk) of a counter.S snapshot with ``mem`` RAM."""
    elf = tinyguest.build("counter", {"COUNT": 3000, "STEP": 50})
    p = subprocess.run([*PYVMM, "boot", "--raw", str(elf), "--mem", mem, "--snapshot-on", "start",
                        "--snapshot-dir", str(directory)], capture_output=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise SystemExit(f"snapshot failed: {p.stderr.decode()[-500:]}")
    # "pyvmm: snapshot saved to DIR (X MiB of memory, N ms)"
    line = next(l for l in p.stderr.decode().splitlines() if "snapshot saved" in l)
    ms = float(line.rsplit(",", 1)[1].split()[0])
    used = sum(f.stat().st_blocks * 512 for f in directory.iterdir())
    return ms / 1000, used


def tiny_part(runs: int, work: Path) -> dict:
    out = {}
    elf = str(tinyguest.build("counter", {"COUNT": 3000, "STEP": 50}))
    snap256, snap2g = work / "tiny-256m", work / "tiny-2g"
    save_s, used = make_tiny_snapshot(snap256, "256M")
    make_tiny_snapshot(snap2g, "2G")
    out["snapshot_ms"] = save_s * 1000
    out["snapshot_disk_mib"] = used / (1 << 20)
    first_run_ms(["restore", str(snap256)])          # warm the page cache and .pyc files
    first_run_ms(["boot", "--raw", elf])
    boot, r256, r2g = [], [], []
    for _ in range(runs):                            # interleaved: drift hits all alike
        boot.append(first_run_ms(["boot", "--raw", elf]))
        r256.append(first_run_ms(["restore", str(snap256)]))
        r2g.append(first_run_ms(["restore", str(snap2g)]))
    out["boot_raw_first_kvm_run_ms"] = statistics.median(boot)
    out["restore_first_kvm_run_ms"] = statistics.median(r256)
    out["restore_2g_first_kvm_run_ms"] = statistics.median(r2g)
    out["restore_2g_vs_256m"] = out["restore_2g_first_kvm_run_ms"] / out["restore_first_kvm_run_ms"]
    return out


def run_true(cache: bool, cache_dir: str, *extra: str) -> float:
    t0 = time.monotonic()
    argv = [*PYVMM, "run", *([] if cache else ["--no-snapshot-cache"]), *extra, "--", "true"]
    p = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, PYVMM_SNAPSHOT_CACHE_DIR=cache_dir))
    if p.returncode != 0:
        raise SystemExit(f"pyvmm run -- true: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    return time.monotonic() - t0


def boot_to_prompt(cache_dir: str, timeout: float = 900) -> float:
    """Seconds from exec of `pyvmm boot` (default guest) to its shell prompt; then
    powers the guest off."""
    import threading
    env = dict(os.environ, PYVMM_SNAPSHOT_CACHE_DIR=cache_dir)
    t0 = time.monotonic()
    p = subprocess.Popen([*PYVMM, "boot", "--timeout", str(timeout)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen, out = threading.Event(), bytearray()

    def reader():
        for chunk in iter(lambda: p.stdout.read1(4096), b""):
            out.extend(chunk)
            if b"\n/ # " in out:
                seen.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        if not seen.wait(timeout):
            raise SystemExit(f"pyvmm boot: no prompt; output tail {bytes(out[-500:])!r}")
        took = time.monotonic() - t0
        p.stdin.write(b"poweroff -f\n")
        p.stdin.close()
        p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return took


def rootfs_image(work: Path) -> Path:
    """A tiny root filesystem (static busybox) as an ext4 image."""
    from vmm.images import make_ext4
    tree = work / "rootfs-tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", tree / "bin" / "busybox")
    (tree / "bin" / "true").symlink_to("busybox")
    return make_ext4(tree, work / "rootfs.img")


GUEST_MEMORY_PROBE = r"""
import os, sys, time
from vmm import Guest
t0 = time.monotonic()
with Guest() as g:
    ready = time.monotonic() - t0
    assert g.restored, "not restored"
    g.run("true").check()
    path = g._machine.restored_from.memory_path
    stats, inside = {}, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and not line[0].isupper():
            inside = parts[-1] == path
        elif inside and parts[0].rstrip(":") in ("Rss", "Pss", "Private_Dirty", "Private_Clean",
                                                  "Shared_Clean", "Shared_Dirty"):
            stats[parts[0].rstrip(":")] = stats.get(parts[0].rstrip(":"), 0) + int(parts[1])
    print(f"{ready:.3f}", " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
"""


def linux_part(concurrent: int, work: Path) -> dict:
    out = {}
    cache_dir = str(work / "snapshot-cache")
    env = dict(os.environ, PYVMM_SNAPSHOT_CACHE_DIR=cache_dir)
    cold = run_true(False, cache_dir)
    run_true(True, cache_dir)                   # boots once more and fills the cache
    warm = statistics.median(run_true(True, cache_dir) for _ in range(3))
    out["run_true_cold_s"] = cold
    out["run_true_warm_s"] = warm
    out["run_true_cold_vs_warm"] = cold / warm
    rootfs = ("--rootfs", str(rootfs_image(work)))
    cold = run_true(False, cache_dir, *rootfs)
    warm = statistics.median(run_true(True, cache_dir, *rootfs) for _ in range(3))
    out["run_rootfs_cold_s"] = cold
    out["run_rootfs_warm_s"] = warm
    out["run_rootfs_cold_vs_warm"] = cold / warm
    cold = boot_to_prompt(cache_dir)            # boots, saves the shell-ready snapshot
    warm = statistics.median(boot_to_prompt(cache_dir) for _ in range(3))
    out["boot_prompt_booted_s"] = cold
    out["boot_prompt_restored_s"] = warm
    out["boot_prompt_booted_vs_restored"] = cold / warm
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", GUEST_MEMORY_PROBE], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(concurrent)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"concurrent restore failed: {stderr.decode()[-800:]}")
        ready, *kv = stdout.decode().split()
        results.append((float(ready), dict(x.split("=") for x in kv)))
    out["concurrent"] = concurrent
    out["concurrent_wall_s"] = time.monotonic() - t0
    out["restore_to_agent_ready_s"] = statistics.median(r[0] for r in results)
    kib = lambda k: [int(r[1].get(k, 0)) for r in results]  # noqa: E731
    out["guest_private_mib_each"] = statistics.median(
        (d + c) / 1024 for d, c in zip(kib("Private_Dirty"), kib("Private_Clean")))
    out["guest_rss_mib_each"] = statistics.median(x / 1024 for x in kib("Rss"))
    out["guest_pss_mib_total"] = sum(kib("Pss")) / 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="start-ups per kind (median)")
    ap.add_argument("--concurrent", type=int, default=8, help="concurrent Linux restores")
    ap.add_argument("--no-linux", action="store_true", help="only the tiny-guest part")
    args = ap.parse_args()
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="pyvmm-bench-snapshot-"))
    try:
        with console.status("tiny guest: snapshot and restore start-up..."):
            res = tiny_part(args.runs, work)
        if not args.no_linux:
            with console.status("Linux guest: cold vs warm pyvmm run, concurrent restores "
                                "(the first boot takes a minute or more here)..."):
                res.update(linux_part(args.concurrent, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title="snapshot / restore")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in res.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(table)
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
