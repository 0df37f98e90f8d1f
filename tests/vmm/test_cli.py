"""The CLI as a user runs it: exit statuses and one-line errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import requires_kvm


def pyvmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(r, status=2):
    assert r.returncode == status, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_version():
    r = pyvmm("--version")
    assert r.returncode == 0 and r.stdout.startswith("pyvmm ")


@pytest.mark.parametrize("args", [
    ["boot", "--raw", "/nonexistent/guest.elf"],
    ["boot", "--raw", "/"],
    ["boot", "--no-such-option"],
    ["--no-such-option"],
    ["boot", "--raw", "/etc/hostname", "--cpus", "x"],
    ["boot", "--raw", "/etc/hostname", "--cpus", "0"],
    ["boot", "--raw", "/etc/hostname", "--on-reboot", "sometimes"],
])
def test_bad_usage_is_one_line_exit_2(args):
    assert_one_line_error(pyvmm(*args))


@requires_kvm
@pytest.mark.parametrize("mem", ["0", "10T", "lots", "1K"])
def test_bad_memory_sizes(tiny, mem):
    assert_one_line_error(pyvmm("boot", "--raw", tiny("hello"), "--mem", mem))


@requires_kvm
def test_not_a_kernel(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x00" * 4096)
    assert_one_line_error(pyvmm("boot", junk))
    assert_one_line_error(pyvmm("boot", "--raw", junk))


@requires_kvm
@pytest.mark.parametrize("loop", ["shim", "python"])
def test_raw_guest_output_and_status(tiny, loop):
    r = pyvmm("boot", "--raw", tiny("hello", {"EXIT_STATUS": 7}), "--loop", loop)
    assert r.stdout == "Hello from a tiny guest\n"
    assert r.returncode == 7


@requires_kvm
def test_triple_fault_exit_status(tiny):
    r = pyvmm("boot", "--raw", tiny("triple_fault"))
    assert r.returncode == 4
    assert "triple" in r.stderr


@requires_kvm
def test_console_log_and_timings(tiny, tmp_path):
    log = tmp_path / "console.log"
    r = pyvmm("boot", "--raw", tiny("hello"), "--console-log", log, "--timings")
    assert r.returncode == 0
    assert log.read_bytes() == b"Hello from a tiny guest\n"
    assert "first console byte" in r.stderr


@requires_kvm
def test_guest_reset_exits_by_default(tiny):
    r = pyvmm("boot", "--raw", tiny("reset"))
    assert (r.returncode, r.stdout) == (0, "resetting\n")


@requires_kvm
def test_on_reboot_restart_boots_again_until_the_timeout(tiny):
    r = pyvmm("boot", "--raw", tiny("reset"), "--on-reboot", "restart", "--timeout", "2")
    assert r.returncode == 130
    assert r.stdout.count("resetting\n") >= 2
    assert r.stderr.count("restarting") >= 1


@requires_kvm
def test_emulation_failure_names_the_symbol_from_a_system_map(tiny, tmp_path):
    from vmm import hostcheck
    if not hostcheck.probe().emulated:
        pytest.skip("hardware-assisted KVM executes popcnt natively")
    guest = tiny("popcnt")
    nm = subprocess.run(["nm", str(guest)], capture_output=True, text=True, check=True).stdout
    entry = next(line.split()[0] for line in nm.splitlines() if line.endswith(" _start"))
    system_map = tmp_path / "System.map"
    end = f"{int(entry, 16) + 0x100:016x}"       # System.map sizes come from the next symbol
    system_map.write_text(f"{entry} T renamed_entry\n{end} T _etext\n")
    r = pyvmm("boot", "--raw", guest, "--system-map", system_map)
    assert r.returncode == 5
    assert "renamed_entry+0x7" in r.stderr and "f3 48 0f b8" in r.stderr


@requires_kvm
@pytest.mark.parametrize("cpus", ["0", "100000", "-3", "two"])
def test_bad_cpu_counts(tiny, cpus):
    assert_one_line_error(pyvmm("boot", "--raw", tiny("hello"), "--cpus", cpus))


def _emulated() -> bool:
    from vmm import hostcheck
    return hostcheck.probe().emulated


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "note:" in line]


# A tiny ELF guest booted without --raw goes through vmm.linux.prepare (the CPU profile,
# the host-detection note) as a Linux kernel would, but runs in milliseconds.

@requires_kvm
def test_boot_prints_no_notes_without_verbose(tiny):
    r = pyvmm("boot", "--raw", tiny("hello"))
    assert (r.returncode, _notes(r.stderr)) == (0, [])
    r = pyvmm("boot", tiny("hello"))
    assert r.stdout == "Hello from a tiny guest\n"
    assert (r.returncode, r.stderr) == (0, "")


@requires_kvm
def test_boot_verbose_prints_the_host_note_on_an_emulation_only_host(tiny):
    r = pyvmm("boot", "--verbose", tiny("hello"))
    assert r.returncode == 0
    host_notes = [n for n in _notes(r.stderr) if "emulation-only" in n]
    assert len(host_notes) == (1 if _emulated() else 0), r.stderr


@requires_kvm
def test_boot_prints_the_held_notes_when_the_guest_fails(tiny):
    r = pyvmm("boot", tiny("triple_fault"))
    assert r.returncode == 4
    assert r.stderr.rstrip().endswith("guest ended: triple-fault: vCPU 0: triple fault")
    host_notes = [n for n in _notes(r.stderr) if "emulation-only" in n]
    assert len(host_notes) == (1 if _emulated() else 0), r.stderr
