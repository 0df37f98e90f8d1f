"""The CLI package's shape: shared options defined once, accepted by boot and run, no
import cycles; and the policy that decides when pyvmm's own notes reach stderr."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

import vmm.cli
from vmm.cli import common

CLI_DIR = Path(vmm.cli.__file__).parent
SHARED = ("--mem", "--disk", "--cmdline", "--cpu-profile", "--loop", "--console-log",
          "--timings", "--timeout", "--net", "--publish")


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(CLI_DIR.glob("*.py"))}


def test_each_shared_option_is_defined_once_in_the_cli_source():
    counts: dict[str, int] = {}
    for tree in _modules().values():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        counts[arg.value] = counts.get(arg.value, 0) + 1
    assert {opt: counts.get(opt, 0) for opt in SHARED} == {opt: 1 for opt in SHARED}


SHARED_ARGV = ["--mem", "512M", "--disk", "a.img,ro", "--disk", "b.img", "--cmdline", "quiet",
               "--cpu-profile", "safe", "--loop", "python", "--console-log", "c.log",
               "--timings", "--timeout", "2.5", "--verbose"]


@pytest.mark.parametrize("argv", [["boot", *SHARED_ARGV, "vmlinux"],
                                  ["run", *SHARED_ARGV, "--", "true"]])
def test_boot_and_run_both_accept_the_shared_options(argv):
    args = vmm.cli.parser().parse_args(argv)
    assert args.command == argv[0]
    assert (args.mem, args.disk, args.cmdline, args.cpu_profile, args.loop, args.console_log,
            args.timings, args.timeout, args.verbose) == \
        ("512M", ["a.img,ro", "b.img"], "quiet", "safe", "python", "c.log", True, 2.5, True)


@pytest.mark.parametrize("command", ["boot", "run"])
def test_shared_option_defaults_are_the_same_for_boot_and_run(command):
    args = vmm.cli.parser().parse_args([command, "--", "x"] if command == "run" else [command])
    assert (args.mem, args.disk, args.cmdline, args.cpu_profile, args.loop, args.console_log,
            args.timings, args.timeout, args.verbose) == \
        ("256M", [], "", "auto", None, None, False, None, False)


def _imports(tree: ast.Module) -> set[str]:
    """vmm.cli modules (by stem; the package itself is '__init__') ``tree`` imports,
    at module level or inside functions."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "vmm.cli":
                found.add("__init__")
            elif name.startswith("vmm.cli."):
                found.add(name.split(".")[2])
    return found


def test_no_cli_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {stem: _imports(tree) - {stem} for stem, tree in modules.items()}
    graph["__init__"] |= set(vmm.cli.COMMANDS)      # imported by name (COMMANDS)
    assert set(vmm.cli.COMMANDS) <= set(modules)

    def cycle_from(start, node, seen):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    cycles = [c for stem in graph if (c := cycle_from(stem, stem, [stem]))]
    assert cycles == []


def test_the_cycle_check_sees_an_import_inside_a_function():
    tree = ast.parse("def main():\n    from vmm.cli import common, boot\n")
    assert _imports(tree) == {"__init__", "common", "boot"}


# -- the notes policy ------------------------------------------------------------------

def test_notes_are_held_without_verbose_and_printed_on_failure():
    printed = []
    notes = common.Notes(False, printed.append)
    notes.add("note: host is emulation-only", "note: AVX")
    assert printed == []
    notes.failed()
    assert printed == ["note: host is emulation-only", "note: AVX"]
    notes.failed()                                  # each note once
    assert printed == ["note: host is emulation-only", "note: AVX"]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_note_added_again_is_said_once(verbose):
    printed = []
    notes = common.Notes(verbose, printed.append)
    notes.add("note: a", "note: b")
    notes.add("note: a")                            # e.g. the VM restarted
    notes.failed()
    assert printed == ["note: a", "note: b"]


def test_notes_are_printed_at_once_with_verbose_and_not_again_on_failure():
    printed = []
    notes = common.Notes(True, printed.append)
    notes.add("note: host is emulation-only")
    assert printed == ["note: host is emulation-only"]
    notes.failed()
    assert printed == ["note: host is emulation-only"]


def test_notes_go_to_stderr_by_default(capsys):
    notes = common.Notes(False)
    notes.add("note: x")
    notes.failed()
    assert capsys.readouterr() == ("", "pyvmm: note: x\n")


@pytest.mark.parametrize("flag, env, expected", [
    (False, None, False), (True, None, True), (False, "1", True), (False, "0", False),
    (False, "", False)])
def test_verbose_from_the_flag_or_pyvmm_verbose(monkeypatch, flag, env, expected):
    if env is None:
        monkeypatch.delenv("PYVMM_VERBOSE", raising=False)
    else:
        monkeypatch.setenv("PYVMM_VERBOSE", env)
    assert common.verbose(types.SimpleNamespace(verbose=flag)) is expected


# -- pyvmm run's stderr, with a fake guest (no VM) --------------------------------------

class _FakeGuest:
    """Stands for vmm.guest.Guest: a note while starting, CMD writes to stderr."""

    fail_with = None

    def __init__(self, **kwargs):
        self.notes, self.times = [], {}

    def start(self):
        self.notes.append("note: KVM on this host is emulation-only (fake)")

    def run(self, cmd, timeout, env, workdir, stdout, stderr):
        stderr(b"CMD's own stderr\n")
        stdout(b"CMD's stdout\n")
        if self.fail_with is not None:
            raise self.fail_with
        return types.SimpleNamespace(exit_code=3)

    def console_tail(self):
        return b""

    def close(self):
        pass


@pytest.fixture
def fake_guest(monkeypatch):
    import vmm.guest
    monkeypatch.setattr(vmm.guest, "Guest", _FakeGuest)
    monkeypatch.delenv("PYVMM_VERBOSE", raising=False)
    monkeypatch.setattr(_FakeGuest, "fail_with", None)
    return _FakeGuest


def test_run_stderr_holds_only_cmds_stderr_when_all_goes_well(fake_guest, capfd):
    assert vmm.cli.main(["run", "--", "sh", "-c", "whatever"]) == 3
    assert capfd.readouterr() == ("CMD's stdout\n", "CMD's own stderr\n")


def test_run_verbose_prints_the_notes_first(fake_guest, capfd):
    assert vmm.cli.main(["run", "-v", "--", "true"]) == 3
    assert capfd.readouterr().err == ("pyvmm: note: KVM on this host is emulation-only (fake)\n"
                                      "CMD's own stderr\n")


def test_run_prints_the_held_notes_when_the_guest_fails(fake_guest, capfd):
    from vmm.guest import GuestError
    fake_guest.fail_with = GuestError("the guest crashed")
    assert vmm.cli.main(["run", "--", "true"]) == 125
    assert capfd.readouterr().err == ("CMD's own stderr\n"
                                      "pyvmm: note: KVM on this host is emulation-only (fake)\n"
                                      "pyvmm: the guest crashed\n")


def test_a_subcommand_imports_only_its_own_module():
    import subprocess
    import sys
    code = ("import sys, vmm.cli\n"
            "try:\n    vmm.cli.main(['mkfs', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('vmm.cli.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[-1] == "['vmm.cli.common', 'vmm.cli.mkfs']"


def test_pyvmm_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        vmm.cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in vmm.cli.COMMANDS), out
