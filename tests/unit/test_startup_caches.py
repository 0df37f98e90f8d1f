"""The two caches that keep a default start cheap: the default guest's manifest
(vmm.defaultguest) and the host probe's verdict (vmm.hostcheck); and what the guest
build prints when stderr is not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from vmm import defaultguest, hostcheck


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def guest(tmp_path, cache):
    """Fake results and inputs recorded in a manifest; returns (vmlinux, initrd, inputs)."""
    vmlinux, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    vmlinux.write_bytes(b"\x7fELF kernel")
    initrd.write_bytes(b"070701")
    inputs = []
    for name in ("fragment", "init", "agent.c"):
        p = tmp_path / name
        p.write_text(name)
        inputs.append(str(p))
    defaultguest.write_manifest(str(vmlinux), str(initrd), inputs)
    return vmlinux, initrd, inputs


def test_manifest_hit_returns_the_recorded_results(guest):
    vmlinux, initrd, _ = guest
    assert defaultguest._lookup() == (str(vmlinux), str(initrd))


@pytest.mark.parametrize("change", ["edit-input", "remove-input", "remove-result",
                                    "env", "corrupt", "version"])
def test_manifest_miss_on_any_change(guest, change, monkeypatch):
    vmlinux, initrd, inputs = guest
    if change == "edit-input":
        Path(inputs[1]).write_text("init, edited")
    elif change == "remove-input":
        os.unlink(inputs[0])
    elif change == "remove-result":
        os.unlink(initrd)
    elif change == "env":
        monkeypatch.setenv("PYVMM_BUSYBOX", "/opt/other/busybox")
    elif change == "corrupt":       # cut short mid-line
        path = Path(defaultguest.manifest_path())
        path.write_bytes(path.read_bytes()[:-7])
    elif change == "version":
        path = Path(defaultguest.manifest_path())
        path.write_text(path.read_text().replace("recipe 1\n", "recipe 2\n"))
    assert defaultguest._lookup() is None


def test_manifest_hit_needs_no_build_machinery(cache, tmp_path):
    """With every real input unchanged, a start finds the guest without importing
    vmm.guestbuild and without running a single subprocess."""
    from vmm import guestbuild
    vmlinux, initrd = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    vmlinux.write_bytes(b"k")
    initrd.write_bytes(b"i")
    defaultguest.write_manifest(str(vmlinux), str(initrd), guestbuild.input_files())
    code = ("import sys; from vmm import defaultguest; r = defaultguest.default_guest(); "
            "print(r[0], r[1], 'vmm.guestbuild' in sys.modules, 'subprocess' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYVMM_CACHE=str(cache)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(vmlinux), str(initrd), "False", "False"]


def test_guest_build_inputs_cover_the_guest_sources():
    from vmm import guestbuild
    files = guestbuild.input_files()
    for p in (guestbuild.FRAGMENT_PATH, guestbuild.INIT_SCRIPT_PATH,
              guestbuild.AGENT_SOURCE_PATH, guestbuild.SOURCE_TARBALL,
              *guestbuild.PATCHES_DIR.glob("*.patch")):
        assert str(p) in files


# --- the host probe's verdict ----------------------------------------------------------


def test_verdict_is_reused_within_a_boot(cache, monkeypatch):
    boot_id = hostcheck._boot_id()
    if boot_id is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id")
    hostcheck._save_verdict(boot_id, hostcheck.HostProfile(True, 1.5, 2_000_000))
    monkeypatch.setattr(hostcheck, "_cached", None)
    monkeypatch.setattr(hostcheck, "measure", lambda kvm=None: pytest.fail("measured again"))
    host = hostcheck.probe()
    assert host.emulated and host.mips == 1.5 and host.tsc_khz == 2_000_000


@requires_kvm
@pytest.mark.parametrize("stale", ["other-boot", "garbage", "always"])
def test_verdict_of_another_boot_or_a_bad_file_is_measured_again(cache, monkeypatch, stale):
    path = Path(hostcheck.verdict_path())
    path.parent.mkdir(parents=True)
    if stale == "garbage":
        path.write_bytes(b"\0not a verdict")
    else:
        boot_id = "another-boot" if stale == "other-boot" else hostcheck._boot_id()
        path.write_text(f"version 1\nboot_id {boot_id}\nmips 12345.0\ntsc_khz 1\n")
    if stale == "always":
        monkeypatch.setenv("PYVMM_PROBE", "always")
    monkeypatch.setattr(hostcheck, "_cached", None)
    calls = []
    real = hostcheck.measure
    monkeypatch.setattr(hostcheck, "measure", lambda kvm=None: calls.append(1) or real(kvm))
    host = hostcheck.probe()
    assert calls == [1] and host.mips != 12345.0
    if stale != "always":   # the fresh verdict replaced the stale file
        assert f"boot_id {hostcheck._boot_id()}\n" in path.read_text()


# --- what a long build says when stderr is not a terminal -------------------------------


def test_build_progress_says_start_and_end_without_a_terminal(capsys):
    from vmm.guestbuild import _Progress
    with _Progress("Building guest kernel (gzip)", "about 5 minutes", Path("/c/k.log")) as p:
        p.step("CC kernel/fork.o")          # steps are not printed line by line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "building guest kernel (gzip)" in err[0] and "about 5 minutes" in err[0]
    assert "/c/k.log" in err[0]
    assert err[1].startswith("pyvmm: done building guest kernel (gzip) in ")


def test_build_progress_says_when_it_failed(capsys):
    from vmm.guestbuild import _Progress
    with pytest.raises(RuntimeError):
        with _Progress("Building guest initramfs", "a few seconds"):
            raise RuntimeError("cpio failed")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "failed after" in err[1]
