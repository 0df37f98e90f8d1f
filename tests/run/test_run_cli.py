"""``pyvmm run`` end to end: one boot per test (about a minute each here)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.run.conftest import BOOT_TIMEOUT_S, pyvmm_run, pyvmm_run_argv

pytestmark = [pytest.mark.linux, pytest.mark.timeout(BOOT_TIMEOUT_S + 180)]

AWKWARD_ARGS = ["a b", "q'uo\"te", "line\nbreak", "ünïcödé €", "", "  two  spaces  ",
                "$HOME", "*", "-n", "back\\slash"]


def test_exit_status_streams_arguments_env_and_workdir(guest_ready):
    """CMD's exit status becomes pyvmm's; stdout and stderr stay apart and hold only
    CMD's output (no kernel messages); awkward arguments, --env and --workdir arrive
    intact."""
    script = ('printf "%s\\0" "$PWD" "$FOO" "$@"; echo "to stderr" >&2; exit 7')
    r = pyvmm_run("--env", "FOO=x = y ü", "--workdir", "/proc", "--",
                  "sh", "-c", script, "sh", *AWKWARD_ARGS)
    assert r.returncode == 7, r.describe()
    fields = r.stdout.split(b"\0")
    assert fields[-1] == b"", r.describe()
    assert [f.decode() for f in fields[:-1]] == ["/proc", "x = y ü", *AWKWARD_ARGS], r.describe()
    assert r.stderr.endswith(b"to stderr\n"), r.describe()
    assert b"Linux version" not in r.stdout + r.stderr    # the console is not shown
    assert b"pyvmm: ready" not in r.stdout


def test_timeout_stops_the_guest_promptly(guest_ready):
    """--timeout: output so far is streamed, the guest is stopped, exit status 124."""
    argv = [*pyvmm_run_argv(), "--boot-timeout", str(BOOT_TIMEOUT_S), "--timeout", "5", "--",
            "sh", "-c", "echo started; sleep 600; echo never"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()          # streamed as it is written, not at the end
        t_started = time.monotonic()
        assert line == b"started\n"
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    elapsed = time.monotonic() - t_started
    assert p.returncode == 124, err.decode(errors="replace")
    assert rest == b"" and b"timed out after 5" in err
    assert elapsed < 5 + 15, f"took {elapsed:.1f} s after the command started"


def _tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 (files), 'dir' (directories), '-> target' (symlinks)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_copy_in_and_copy_out_a_tree(guest_ready, tmp_path):
    """--copy-in makes a host tree readable (read-only) in the guest; --copy-out brings
    a guest tree back after CMD; checksums match on both sides; no files are left in
    the temporary directory."""
    src = tmp_path / "src"
    (src / "sub dir" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("hello\n")
    (src / "sub dir" / "ünï.bin").write_bytes(os.urandom(200_000))
    (src / "sub dir" / "deeper" / "z").write_bytes(bytes(range(256)) * 64)
    (src / "link").symlink_to("a.txt")
    (src / "exec.sh").write_text("#!/bin/sh\necho run-from-copy-in\n")
    (src / "exec.sh").chmod(0o755)
    want = _tree(src)
    tmpdir = Path(tempfile.gettempdir())
    before = set(tmpdir.iterdir())

    script = r"""
set -e
/in/exec.sh
cd /in && find . -type f > /tmp/files && sort /tmp/files > /tmp/sorted
while read -r f; do sha256sum "$f"; done < /tmp/sorted
touch /in/x 2>/dev/null && echo WRITABLE || echo read-only
cp -a /in /tmp/work
echo made-in-guest > /tmp/work/new.txt
"""
    r = pyvmm_run("--copy-in", f"{src}:/in", "--copy-out", f"/tmp/work:{tmp_path / 'out'}",
                  "--", "sh", "-c", script)
    assert r.returncode == 0, r.describe()
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "run-from-copy-in" and lines[-1] == "read-only", r.describe()
    guest_sums = {path[2:]: digest for digest, path in (l.split("  ", 1) for l in lines[1:-1])}
    assert guest_sums == {k: v for k, v in want.items() if v not in ("dir",) and
                          not v.startswith("->")}

    got = _tree(tmp_path / "out")
    assert got.pop("lost+found") == "dir"     # every ext4 root has one (mkfs.ext4 -d)
    assert got.pop("new.txt") == hashlib.sha256(b"made-in-guest\n").hexdigest()
    assert got == want
    assert os.access(tmp_path / "out" / "exec.sh", os.X_OK)
    assert set(tmpdir.iterdir()) == before
    assert not list(tmp_path.glob(".pyvmm-copyout-*"))
