"""Snapshot and restore of the default Linux guest (vmm.snapshot): the cache of booted
disposable guests (vmm.Guest, ``pyvmm run``), guests restored from one snapshot at once
(each its own clock and RNG, from the agent's INIT frame), and ``pyvmm boot
--snapshot-on`` / ``pyvmm restore`` with the console, guest memory and a copy-on-write
disk carried across.

Each test that needs a cold cache gets a private one (``$PYVMM_SNAPSHOT_CACHE_DIR``,
vmm.snapshot.cache.root: only the snapshots move, not the kernel build cache). A boot
costs 60-90 s on emulation-only hosts, a restore a few seconds; about six boots here.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.linux.conftest import BOOT_TIMEOUT_S, pyvmm_command, run_pyvmm

pytestmark = pytest.mark.linux

CACHE_ENV = "PYVMM_SNAPSHOT_CACHE_DIR"
RESTORE_TIMEOUT_S = 180
#: The marker a guest command prints once its state is set up (snapshot taken there).
SNAP_MARKER = "SNAP-HERE"

#: A cache made warm by the first test, reused by the second (saves a boot).
_warm: dict[str, Path] = {}


def cache_entries(directory: Path) -> list[str]:
    """Keys of the complete snapshots in a cache directory."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and ".tmp-" not in p.name and (p / "state.json").is_file())


def warm_cache(tmp_path: Path, monkeypatch) -> Path:
    """Point the snapshot cache at the one the first test filled, or else at a new
    one filled here (one boot): a cache with one snapshot of the default guest."""
    from vmm import Guest
    cache = _warm.get("cache")
    if cache is None or not cache_entries(cache):
        cache = tmp_path / "snapshots"
        monkeypatch.setenv(CACHE_ENV, str(cache))
        with Guest() as g:
            assert not g.restored
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


def boot_seconds(g) -> float:
    return g.times["ready"] - g.times["start"]


def restore_cli(directory: Path, feed: str, delay: float = 5.0,
                timeout: int = RESTORE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``pyvmm restore DIRECTORY`` with ``feed`` written to its stdin (a pipe) after
    ``delay`` seconds, then EOF (the guest runs on after EOF)."""
    feeder = subprocess.Popen(["sh", "-c", f"sleep {delay}; printf '%s' \"$FEED\""],
                              stdout=subprocess.PIPE, env={**os.environ, "FEED": feed})
    try:
        proc = subprocess.run([*pyvmm_command(), "restore", str(directory),
                               "--timeout", str(timeout)],
                              stdin=feeder.stdout, capture_output=True, text=True,
                              errors="replace", timeout=timeout + 60)
    finally:
        feeder.stdout.close()
        feeder.kill()
        feeder.wait()
    return proc


def describe(proc) -> str:
    return (f"exit status {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-3000:]}")


# -- the cache of booted disposable guests ----------------------------------------------


@pytest.mark.timeout(2 * BOOT_TIMEOUT_S + 120)
def test_second_guest_of_a_shape_is_restored_and_much_faster(default_guest, tmp_path,
                                                             monkeypatch):
    from vmm import Guest
    cache = tmp_path / "snapshots"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    assert cache_entries(cache) == []

    with Guest() as g1:
        assert not g1.restored, "a guest restored from an empty cache"
        r = g1.run("echo first-$((6*7)); uname -s")
        assert r.exit_code == 0, r
        assert r.stdout == b"first-42\nLinux\n"
        t1 = boot_seconds(g1)
    keys = cache_entries(cache)
    assert len(keys) == 1, f"the first guest left {keys} in its cache"

    with Guest() as g2:
        t2 = boot_seconds(g2)
        assert g2.restored, f"the second guest booted (notes: {g2.notes})"
        assert any(keys[0] in n for n in g2.notes), g2.notes
        r = g2.run("echo ok")
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"ok\n", b""), r
        r = g2.run("sh -c 'exit 3'")
        assert r.exit_code == 3
    print(f"boot to agent ready {t1:.2f} s, restore to agent ready {t2:.2f} s")
    assert t2 < t1 / 5, f"restore took {t2:.2f} s, the boot {t1:.2f} s"
    _warm["cache"] = cache


@pytest.mark.timeout(BOOT_TIMEOUT_S + 240)
def test_guests_restored_at_once_have_their_own_rng_and_the_hosts_clock(default_guest,
                                                                        tmp_path, monkeypatch):
    from vmm import Guest
    cache = warm_cache(tmp_path, monkeypatch)
    (key,) = cache_entries(cache)
    # Make the snapshot's own clock clearly wrong: a guest that kept it would be late.
    age = time.time() - os.stat(cache / key / "state.json").st_mtime
    if age < 30:
        time.sleep(30 - age)

    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            barrier.wait(60)
            with Guest() as g:
                rng = g.run("head -c 16 /dev/urandom | od -An -tx1")
                before = time.time()
                clock = g.run("date +%s")
                after = time.time()
                results[i] = (g.restored, rng, clock, before, after, g.notes)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESTORE_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a restored guest hung"
    for i in range(2):
        assert not isinstance(results[i], BaseException), results[i]
    randoms = []
    for i in range(2):
        restored, rng, clock, before, after, notes = results[i]
        assert restored, f"guest {i} booted (notes: {notes})"
        assert rng.exit_code == 0 and clock.exit_code == 0, (rng, clock)
        hexbytes = rng.stdout.split()
        assert len(hexbytes) == 16, rng
        randoms.append(rng.stdout)
        guest_now = int(clock.stdout)
        assert before - 3 <= guest_now <= after + 3, \
            f"guest {i} clock {guest_now} vs host {before:.1f}..{after:.1f}"
    assert randoms[0] != randoms[1], f"both restored guests read {randoms[0]!r}"


@pytest.mark.timeout(3 * BOOT_TIMEOUT_S + 240)
def test_pyvmm_run_restores_from_the_cache_and_no_snapshot_cache_boots(default_guest, tmp_path):
    cache = tmp_path / "snapshots"
    env = {**os.environ, CACHE_ENV: str(cache)}
    argv = [sys.executable, "-m", "vmm.cli", "run", "--verbose",
            "--boot-timeout", str(BOOT_TIMEOUT_S)]
    note = "started from a cached snapshot"

    def run(*extra: str, status: int):
        p = subprocess.run([*argv, *extra, "--", "sh", "-c", f"echo out-{status}; exit {status}"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", env=env, timeout=BOOT_TIMEOUT_S + 120)
        assert p.returncode == status, describe(p)
        assert p.stdout == f"out-{status}\n", describe(p)
        return p

    first = run(status=7)
    assert note not in first.stderr, describe(first)
    keys = cache_entries(cache)
    assert len(keys) == 1, f"cache after the first run: {keys}"

    second = run(status=7)
    assert f"{note} ({keys[0]})" in second.stderr, describe(second)
    assert cache_entries(cache) == keys

    third = run("--no-snapshot-cache", status=5)
    assert note not in third.stderr, describe(third)
    assert cache_entries(cache) == keys


# -- pyvmm boot --snapshot-on / pyvmm restore -------------------------------------------


@pytest.mark.timeout(BOOT_TIMEOUT_S + RESTORE_TIMEOUT_S + 180)
def test_boot_snapshot_on_ready_then_restore_runs_the_shell(default_guest, tmp_path):
    snap = tmp_path / "snap"
    r = run_pyvmm("--snapshot-on", "pyvmm: ready", "--snapshot-dir", str(snap))
    assert r.returncode == 0, r.describe()
    assert "snapshot saved to" in r.stderr, r.describe()
    assert (snap / "state.json").is_file() and (snap / "memory").is_file(), \
        sorted(p.name for p in snap.iterdir()) if snap.is_dir() else "no directory"

    p = restore_cli(snap, "echo restored-$((6*7))\npoweroff -f\n", delay=8)
    assert p.returncode == 0, describe(p)
    assert re.search(r"^restored-42\r?$", p.stdout, re.M), describe(p)


@pytest.mark.timeout(BOOT_TIMEOUT_S + RESTORE_TIMEOUT_S + 180)
def test_restore_keeps_guest_memory_and_a_running_process(default_guest, tmp_path):
    """The snapshot is taken while a shell script runs: after the restore, the same
    process goes on (its variable, a tmpfs file written before, a read it was in)."""
    snap = tmp_path / "snap"
    cmd = (f'echo "state-$((6*7))" > /tmp/before; v="kept-$$"; echo {SNAP_MARKER}; '
           'read line; echo "after: $(cat /tmp/before) $v $line"; exit 9')
    r = run_pyvmm("--snapshot-on", SNAP_MARKER, "--snapshot-dir", str(snap), command=cmd)
    assert r.returncode == 0, r.describe()
    assert (snap / "state.json").is_file(), r.describe()
    assert "after:" not in r.stdout, r.describe()

    p = restore_cli(snap, "typed-in\n")
    assert p.returncode == 0, describe(p)
    m = re.search(r"^after: state-42 kept-(\d+) typed-in\r?$", p.stdout, re.M)
    assert m, describe(p)
    assert "pyvmm: exit 9" in p.stdout, describe(p)


@pytest.mark.timeout(BOOT_TIMEOUT_S + RESTORE_TIMEOUT_S + 180)
def test_restore_keeps_a_copy_on_write_disk_and_never_writes_the_image(default_guest, tmp_path):
    from vmm.images import make_ext4
    src = tmp_path / "src"
    src.mkdir()
    (src / "orig.txt").write_text("original\n")
    img = make_ext4(src, tmp_path / "disk.img", 16 << 20)

    def sha() -> str:
        return hashlib.sha256(img.read_bytes()).hexdigest()

    digest = sha()
    snap = tmp_path / "snap"
    m = "/tmp/d"
    cmd = (f"mkdir -p {m} && mount -t ext4 /dev/vda {m} && echo written-before > {m}/new.txt "
           f"&& sync && echo {SNAP_MARKER} && read line && umount {m} "
           f"&& echo 3 > /proc/sys/vm/drop_caches && mount -t ext4 /dev/vda {m} "
           f"&& echo \"disk: $(cat {m}/new.txt) $(cat {m}/orig.txt) $line\" "
           f"&& echo after > {m}/after.txt && umount {m}")
    r = run_pyvmm("--disk", f"{img},snapshot", "--snapshot-on", SNAP_MARKER,
                  "--snapshot-dir", str(snap), command=cmd)
    assert r.returncode == 0, r.describe()
    assert (snap / "state.json").is_file(), r.describe()
    assert any(p.name.endswith(".overlay") for p in snap.iterdir()), sorted(snap.iterdir())
    assert sha() == digest, "the boot wrote to the image behind a snapshot disk"

    p = restore_cli(snap, "go\n")
    assert p.returncode == 0, describe(p)
    assert re.search(r"^disk: written-before original go\r?$", p.stdout, re.M), describe(p)
    assert "pyvmm: exit 0" in p.stdout, describe(p)
    assert sha() == digest, "the restored guest wrote to the image behind a snapshot disk"


# -- disks inserted after a restore (vmm/disk/empty.py) ---------------------------------


def _rootfs(tmp_path: Path, name: str, marker: str) -> Path:
    """A tiny root filesystem image: static busybox and /etc/marker."""
    import shutil
    from vmm.images import make_ext4
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static not installed")
    tree = tmp_path / f"tree-{name}"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy(busybox, tree / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "mkdir", "ls"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "marker").write_text(marker + "\n")
    return make_ext4(tree, tmp_path / f"{name}.img")


@pytest.mark.timeout(BOOT_TIMEOUT_S + 2 * RESTORE_TIMEOUT_S)
def test_guests_with_disks_are_restored_and_get_their_own_disks(default_guest, tmp_path,
                                                                monkeypatch):
    from vmm import Guest
    cache = warm_cache(tmp_path, monkeypatch)
    keys = cache_entries(cache)
    images = {n: _rootfs(tmp_path, n, f"marker-{n}") for n in ("a", "b")}
    before = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in images.items()}
    for n in ("a", "b"):
        data = tmp_path / f"data-{n}"
        data.mkdir()
        (data / "in.txt").write_text(f"copied-in-{n}\n")
        with Guest(rootfs=images[n], copy_in=[(data, "/data")], scratch_size="32M") as g:
            assert g.restored, f"a guest with disks booted (notes: {g.notes})"
            r = g.run("cat /etc/marker /data/in.txt; test -e /bin/pyvmm-agent || echo chrooted; "
                      "echo written > /etc/marker; mkdir -p /out; echo out-" + n + " > /out/f")
            assert r.exit_code == 0, r
            assert r.stdout == f"marker-{n}\ncopied-in-{n}\nchrooted\n".encode(), r
            r = g.run("echo x > /data/in.txt")   # a copy-in image is read-only
            assert r.exit_code != 0, r
            got = g.copy_out("/out", tmp_path / f"out-{n}")
            assert (got / "f").read_text() == f"out-{n}\n"
    assert cache_entries(cache) == keys, "guests with disks saved snapshots of their own"
    after = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in images.items()}
    assert after == before, "a root filesystem image was modified"


# -- pyvmm boot: the default guest's "shell ready" snapshot (vmm/cli/shellsnap.py) ------


def _shell_session(env: dict, timeout: float = BOOT_TIMEOUT_S):
    """``pyvmm boot --verbose`` of the default guest: wait for the shell prompt, run
    one command line, power off. Returns (stdout, stderr, seconds from exec to the
    prompt, host time just before the command was sent)."""
    proc = subprocess.Popen([*pyvmm_command(), "boot", "--verbose", "--timeout", str(timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out = bytearray()
    errs = bytearray()
    got = threading.Event()

    def reader(stream, sink, watch):
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.extend(chunk)
            if watch and b"\n/ # " in sink:
                got.set()

    threads = [threading.Thread(target=reader, args=(proc.stdout, out, True), daemon=True),
               threading.Thread(target=reader, args=(proc.stderr, errs, False), daemon=True)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        assert got.wait(timeout), f"no prompt; stdout tail {bytes(out[-2000:])!r}"
        to_prompt = time.monotonic() - t0
        sent_at = time.time()
        proc.stdin.write(b"echo shell-$((6*7)); date +%s\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while b"shell-42" not in out and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.stdin.write(b"poweroff -f\n")
        proc.stdin.close()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(10)
    return bytes(out).decode(errors="replace"), bytes(errs).decode(errors="replace"), \
        to_prompt, sent_at, proc.returncode


@pytest.mark.timeout(BOOT_TIMEOUT_S + RESTORE_TIMEOUT_S + 240)
def test_pyvmm_boot_of_the_default_guest_restores_its_shell_ready_snapshot(default_guest,
                                                                          tmp_path):
    cache = tmp_path / "snapshots"
    env = {**os.environ, CACHE_ENV: str(cache)}
    note = "started from a cached snapshot"
    out1, err1, t1, _, rc1 = _shell_session(env)
    assert rc1 == 0, (out1[-2000:], err1)
    assert note not in err1, err1
    assert re.search(r"^shell-42\r?$", out1, re.M), out1[-2000:]
    keys = cache_entries(cache)
    assert len(keys) == 1 and keys[0].startswith("shell-"), keys

    time.sleep(5)       # the snapshot's clock is now behind: the agent must set it
    out2, err2, t2, sent_at, rc2 = _shell_session(env)
    assert rc2 == 0, (out2[-2000:], err2)
    assert f"{note} ({keys[0]})" in err2, err2
    assert "Linux version" not in out2, "the restored guest booted its kernel"
    assert re.search(r"^shell-42\r?$", out2, re.M), out2[-2000:]
    guest_now = int(re.search(r"^(\d{10})\r?$", out2, re.M).group(1))
    assert sent_at - 3 <= guest_now <= time.time() + 3, (guest_now, sent_at)
    print(f"pyvmm boot: prompt after {t1:.2f} s booted, {t2:.2f} s restored")
    assert t2 < t1 / 3, f"restored prompt after {t2:.2f} s, booted after {t1:.2f} s"


@pytest.mark.timeout(BOOT_TIMEOUT_S + 2 * RESTORE_TIMEOUT_S)
def test_guest_snapshot_and_a_guest_restored_from_it(default_guest, tmp_path, monkeypatch):
    """Guest.snapshot(dir) between commands, Guest(restore=dir) in another process:
    the rootfs chroot, a file written in it and a background process carry over; the
    image is never written; a guest with copy-in images cannot be saved."""
    from vmm import Guest
    from vmm.guest import GuestError
    warm_cache(tmp_path, monkeypatch)
    image = _rootfs(tmp_path, "c", "marker-c")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    snap = tmp_path / "saved"
    with Guest(rootfs=image) as g:
        r = g.run("echo kept > /state; (while :; do sleep 1; done) & echo started")
        assert r.exit_code == 0 and r.stdout == b"started\n", r
        info = g.snapshot(snap)
        assert info.memory_stored > 0
        r = g.run("echo after > /state")      # the original guest goes on
        assert r.exit_code == 0, r
    probe = ("from vmm import Guest\n"
             f"with Guest(restore={str(snap)!r}) as g:\n"
             "    r = g.run('cat /state /etc/marker; test -e /bin/pyvmm-agent || echo chrooted;"
             " ps | grep -c \"sleep 1\" >/dev/null && echo loop-alive')\n"
             "    print(g.restored, r.exit_code, r.stdout.decode().split())\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=RESTORE_TIMEOUT_S, env=os.environ)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "True 0 ['kept', 'marker-c', 'chrooted', 'loop-alive']", \
        (p.stdout, p.stderr[-2000:])
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
    data = tmp_path / "d"
    data.mkdir()
    with Guest(copy_in=[(data, "/d")]) as g:
        with pytest.raises(GuestError, match="cannot be saved"):
            g.snapshot(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


#: Typed into the restored 2-vCPU guest's shell: each CPU does some work pinned to it,
#: at once, and says which CPU it ran on (field 39 of /proc/self/stat: the processor).
SMP_FEED = r"""echo nproc=$(nproc)
for i in 0 1; do taskset -c $i sh -c 'n=0; while [ $n -lt 200 ]; do n=$((n+1)); done; echo "cpu$0 done $n on $(cut -d" " -f39 /proc/self/stat)"' $i & done; wait
taskset -c 1 sh -c 'sync; poweroff -f'
"""


@pytest.mark.timeout(2 * BOOT_TIMEOUT_S + RESTORE_TIMEOUT_S + 180)
def test_two_vcpu_guest_restores_with_both_cpus_working(default_guest, tmp_path):
    snap = tmp_path / "snap"
    r = run_pyvmm("--cpus", "2", "--snapshot-on", "pyvmm: ready", "--snapshot-dir", str(snap),
                  timeout=2 * BOOT_TIMEOUT_S)
    assert r.returncode == 0, r.describe()
    assert (snap / "state.json").is_file(), r.describe()

    p = restore_cli(snap, SMP_FEED, delay=8)
    out = p.stdout.replace("\r\n", "\n")
    assert p.returncode == 0, describe(p)
    assert re.search(r"^nproc=2$", out, re.M), describe(p)
    for i in (0, 1):
        assert re.search(rf"^cpu{i} done 200 on {i}$", out, re.M), describe(p)
    assert re.search(r"reboot: (System halted|Power down)", out), describe(p)
