"""The disposable guests' snapshot cache (vmm.snapshot.cache) without a VM: keys,
lookup, least-recently-used eviction under the size bound, clear, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vmm.cpuprofile import HostQuirks
from vmm.snapshot import cache


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_SNAPSHOT_CACHE_DIR", str(tmp_path / "snaps"))
    return tmp_path / "snaps"


def fake_snapshot(key: str, size: int) -> None:
    d = cache.path_for(key)
    os.makedirs(d)
    with open(os.path.join(d, "state.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(d, "memory"), "wb") as f:
        f.write(os.urandom(size))           # real blocks: the bound counts disk use


def test_key_follows_every_part_of_the_shape(tmp_path):
    k, i = tmp_path / "vmlinux", tmp_path / "initrd"
    k.write_bytes(b"kernel")
    i.write_bytes(b"initrd")
    base = dict(kernel=k, initrd=i, mem_size=256 << 20, cpus=1, cmdline="console=ttyS0",
                quirks=HostQuirks(True, True))
    key = cache.key(**base)
    assert cache.key(**base) == key
    for change in (dict(mem_size=512 << 20), dict(cpus=2), dict(cmdline="console=ttyS1"),
                   dict(quirks=HostQuirks(False, True))):
        assert cache.key(**{**base, **change}) != key
    time.sleep(0.01)
    i.write_bytes(b"initrd, rebuilt")       # a rebuilt initramfs (new agent): a new key
    assert cache.key(**base) != key


def test_lookup_finds_only_complete_snapshots(root):
    assert cache.lookup("a" * 24) is None
    os.makedirs(cache.path_for("b" * 24))     # a directory without state.json
    assert cache.lookup("b" * 24) is None
    fake_snapshot("c" * 24, 1000)
    assert cache.lookup("c" * 24) == str(root / ("c" * 24))


def test_eviction_keeps_the_most_recently_used_within_the_bound(root):
    for n, k in enumerate(("old", "mid", "new")):
        fake_snapshot(k, 256 << 10)
        cache._touch(k)
        os.utime(root / f"{k}.used", (1000 + n, 1000 + n))
    cache.lookup("old")                       # used just now: the most recent
    removed = cache.evict(600 << 10)          # room for two of the three
    assert removed == ["mid"]
    assert sorted(e["key"] for e in cache.entries()) == ["new", "old"]
    assert not (root / "mid").exists() and not (root / "mid.used").exists()


def test_stored_applies_the_bound_from_the_environment(root, monkeypatch):
    monkeypatch.setenv("PYVMM_SNAPSHOT_CACHE_MAX", str(300 << 10))
    fake_snapshot("first", 256 << 10)
    cache.stored("first")
    time.sleep(0.01)
    fake_snapshot("second", 256 << 10)
    cache.stored("second")
    assert [e["key"] for e in cache.entries()] == ["second"]


def test_clear_and_the_cli(root):
    fake_snapshot("one", 4096)
    fake_snapshot("two", 4096)
    env = dict(os.environ, PYVMM_SNAPSHOT_CACHE_DIR=str(root))
    p = subprocess.run([sys.executable, "-m", "vmm.cli", "cache", "list"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "one" in p.stdout and "two" in p.stdout
    assert "2 snapshots" in p.stdout
    p = subprocess.run([sys.executable, "-m", "vmm.cli", "cache", "clear"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "removed 2" in p.stderr
    assert cache.entries() == []
    p = subprocess.run([sys.executable, "-m", "vmm.cli", "cache", "drop"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PYVMM_SNAPSHOT_CACHE", "0")
    assert not cache.enabled()
    monkeypatch.setenv("PYVMM_SNAPSHOT_CACHE", "1")
    assert cache.enabled()
